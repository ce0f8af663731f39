-- Commit tokens: how an appender learns whether a commit it lost track of happened.
-- Applied once at start-up; never edit after it has shipped, add a new file.
--
-- Every appender transaction that writes events inserts one random token here before it
-- commits. If the connection dies during COMMIT, the appender asks on another connection
-- whether its token is in the table: the row is durable exactly when the events are. A
-- transaction id cannot answer this: after a crash PostgreSQL hands the ids of transactions
-- that never reached disk to new ones, so `txid_status` can report someone else's commit.
--
-- Rows are only needed for the seconds an in-doubt commit takes to resolve; retention's
-- periodic pass deletes those older than a few minutes.
create table commit_tokens (
    token   uuid        primary key,
    at      timestamptz not null default now()
);

create index commit_tokens_at on commit_tokens (at);
