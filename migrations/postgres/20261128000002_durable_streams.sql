-- The Durable Streams surface (/v1/stream/{name}, docs/durable-streams.md). Its streams are
-- ordinary streams of the event log; these tables hold only what the protocol adds.
-- Applied once at start-up; never edit after it has shipped, add a new file.

-- A byte payload (a Durable Streams stream whose content type is not JSON), stored exactly
-- as received. Null for every JSON event; when set, `data` holds `null` and the envelope
-- carries these bytes base64-encoded (`"encoding":"base64"`).
alter table events add column body bytea;

-- One row per Durable Streams stream, keyed by the log's stream name. A stream created with
-- no content has no row in `streams` until its first append (the appender creates that row);
-- this row is what makes it exist for the protocol meanwhile.
create table ds_streams (
    name          text        primary key collate "C",
    -- the Content-Type given at creation, as sent (compared case-insensitively).
    content_type  text        not null,
    -- sliding time-to-live in seconds (Stream-TTL); expires `ttl_s` after `accessed_at`.
    ttl_s         bigint,
    -- absolute expiry (Stream-Expires-At).
    expires_at    timestamptz,
    -- the stream this one was forked from, and the seq it forked at (events 1..fork_seq
    -- were copied from the source through the appender at creation).
    fork_of       text        collate "C",
    fork_seq      bigint,
    -- Stream-Fork-Sub-Offset as requested (messages or bytes past the fork offset), so that
    -- an identical re-create is recognised; 0 when absent.
    fork_sub      bigint,
    -- soft-deleted: gone for clients (410), kept while forks name it as their source.
    deleted       boolean     not null default false,
    -- the last Stream-Seq accepted (writer ordering, compared bytewise).
    writer_seq    text        collate "C",
    -- the producer request (id, epoch, seq) that closed the stream, so its retry is a duplicate.
    closed_by     text,
    -- last read or write, for the sliding TTL.
    accessed_at   timestamptz not null,
    created_at    timestamptz not null
);

create index ds_streams_fork_of on ds_streams (fork_of) where fork_of is not null;

-- Idempotent producers: the last (epoch, seq) accepted from each producer on a stream. The
-- events of an accepted request carry event ids derived from (producer, epoch, seq), so the
-- appender's idempotency index is what guarantees no duplicate even if this row lags.
create table ds_producers (
    name          text        not null collate "C",
    producer_id   text        not null collate "C",
    epoch         bigint      not null,
    seq           bigint      not null,
    primary key (name, producer_id)
);
