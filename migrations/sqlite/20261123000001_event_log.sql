-- The event log on the embedded backend (SQLite, WAL). The same tables and columns as the
-- PostgreSQL schema (see migrations/postgres), with SQLite's types: every time is an INTEGER of
-- milliseconds since the Unix epoch (the wire precision), booleans are INTEGER 0/1.
-- Applied once at start-up; never edit after it has shipped, add a new file.
--
-- One process writes, through one connection, each batch in a `BEGIN IMMEDIATE` transaction:
-- SQLite's write lock plays the part of PostgreSQL's stream row locks (seqs gap-free, commit
-- order equal to seq order). The file is held by one process at a time (a lock file beside it).

create table streams (
    id          integer primary key,
    -- 1..200 chars of [A-Za-z0-9_.:@-], checked by the service; compared bytewise (BINARY).
    name        text    not null unique,
    head        integer not null default 0,
    trimmed_to  integer not null default 0,
    closed      integer not null default 0,
    max_age_s   integer,
    max_events  integer,
    created_at  integer not null,
    updated_at  integer not null
);

create table events (
    stream_id   integer not null references streams (id) on delete cascade,
    seq         integer not null,
    type        text    not null,
    -- the JSON value exactly as the producer sent it.
    data        text    not null,
    event_id    text,
    key         text,
    time        integer not null,
    primary key (stream_id, seq)
);

create unique index events_idempotency on events (stream_id, event_id) where event_id is not null;
create index events_time on events (stream_id, time);
create index events_key on events (stream_id, key, seq) where key is not null;
