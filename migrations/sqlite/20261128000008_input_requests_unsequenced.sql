-- See migrations/postgres: the sweeper's repair reads only rows whose seq is still null, so a
-- partial index keeps its two statements from scanning every request ever made.
create index input_requests_unsequenced on input_requests (created_at) where seq is null;
