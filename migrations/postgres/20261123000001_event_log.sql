-- The event log. Applied once at start-up; never edit after it has shipped, add a new file.

-- One row per stream. `id` is a surrogate key so that event rows carry 8 bytes, not the name.
-- The appender takes this row's lock (`select ... for update`) while it assigns seqs and holds
-- it to commit: that lock is what makes seqs gap-free and commit order equal seq order.
create table streams (
    id          bigint generated always as identity primary key,
    -- 1..200 chars of [A-Za-z0-9_.:@-], checked by the service (StreamName::parse).
    name        text        not null unique collate "C",
    -- seq of the newest event; 0 for a stream with no events. Only the appender writes it.
    head        bigint      not null default 0,
    -- every event with seq <= trimmed_to has been removed by retention; oldest = trimmed_to + 1.
    trimmed_to  bigint      not null default 0,
    -- true once `stream.closed` has been appended; no further appends are accepted.
    closed      boolean     not null default false,
    -- per-stream retention overrides (null: the server default applies).
    max_age_s   bigint,
    max_events  bigint,
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now()
);

create table events (
    stream_id   bigint      not null references streams (id) on delete cascade,
    -- 1, 2, 3, ... within the stream, assigned under the stream row lock.
    seq         bigint      not null,
    type        text        not null,
    -- the JSON value exactly as the producer sent it (text, not jsonb: jsonb reorders keys).
    data        text        not null,
    -- the producer's idempotency key, unique within the stream when present.
    event_id    text,
    -- groups events for snapshots: the latest event per key.
    key         text,
    -- commit time of the batch, truncated to milliseconds (the wire precision).
    time        timestamptz not null,
    primary key (stream_id, seq)
);

create unique index events_idempotency on events (stream_id, event_id) where event_id is not null;
-- `since=` reads start at the first event at or after a time.
create index events_time on events (stream_id, time);
-- snapshots: the newest event per key.
create index events_key on events (stream_id, key, seq) where key is not null;
