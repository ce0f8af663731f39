-- The sweeper's repair of interrupted creations (`log::inputs::repair_unsequenced`) runs every
-- second on every node and looks only at rows whose `input.requested` seq is still unknown.
-- Those are a handful at most (a creation between its insert and its append, or one a crash
-- interrupted), so this partial index stays tiny while the table grows: without it both the
-- update and the delete were sequential scans of every request ever made (62 ms at 200k rows).
create index input_requests_unsequenced on input_requests (created_at) where seq is null;
