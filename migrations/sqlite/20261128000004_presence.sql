-- Authorship on the embedded backend; see migrations/postgres for what each column means.
-- (Presence on one node is kept in memory: no table.)

alter table events add column "by" text;
alter table input_requests add column answered_by text;
