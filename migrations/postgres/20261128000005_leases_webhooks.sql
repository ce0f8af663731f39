-- Stream leases and webhooks. Applied once at start-up; never edit after it has shipped, add
-- a new file.

-- A producer's lease on a stream: when `lease_s` seconds pass without activity (an append or
-- a heartbeat), the lease sweeper closes the stream with `stream.closed` {"reason":"abandoned"}.
-- Last activity is greatest(updated_at, heartbeat_at): every append already moves
-- `updated_at` (the appender and tailcast.append_jobs set it), so appends cost nothing more.
-- null: no lease.
alter table streams add column lease_s bigint;
-- The last `POST /v1/streams/{stream}/heartbeat` (or lease change); null if none.
alter table streams add column heartbeat_at timestamptz;

-- The sweeper's scan: open streams with a lease. `updated_at` stays out of the index (it
-- changes on every append, and an indexed column would cost appends their HOT updates).
create index streams_leased on streams (id) where lease_s is not null and not closed;

-- Webhooks: durable consumers of the log. tailcast POSTs each event of the streams whose
-- name starts with `prefix` (of `types`, if given) to `url`, in seq order per stream.
create table webhooks (
    -- a UUID, made by the server.
    id          text        primary key,
    -- http://… (checked by the service).
    url         text        not null,
    prefix      text        not null collate "C",
    -- JSON array of event types (text, as the admin sent it, re-encoded); null: every type.
    types       text,
    -- the HMAC-SHA256 key of the `tailcast-signature` header; never shown again.
    secret      text        not null,
    -- events committed before this time are not delivered.
    created_at  timestamptz not null
);

-- Where each webhook stands on each stream: the row is the durable position (nothing at or
-- below `delivered` is sent again, nothing above it is skipped) and the delivery lease (only
-- `owner`, until `lease_until`, delivers this webhook on this stream; another node takes over
-- once the lease has run out, e.g. after its owner was killed).
create table webhook_positions (
    webhook_id      text        not null references webhooks (id) on delete cascade,
    stream_id       bigint      not null references streams (id) on delete cascade,
    -- seq of the last event answered with a 2xx (or skipped: not of the webhook's types).
    delivered       bigint      not null,
    -- node id of the deliverer, and until when its claim holds.
    owner           text,
    lease_until     timestamptz,
    -- failed attempts at the event after `delivered`, and the last failure.
    attempts        integer     not null default 0,
    last_error      text,
    primary key (webhook_id, stream_id)
);

-- A stream's deletion removes its positions (cascade) through this index.
create index webhook_positions_stream on webhook_positions (stream_id);
