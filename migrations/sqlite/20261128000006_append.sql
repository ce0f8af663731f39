-- Append semantics on the embedded backend; see migrations/postgres for what the column means.
-- Booleans are INTEGER 0/1.

alter table events add column append integer not null default 0;
