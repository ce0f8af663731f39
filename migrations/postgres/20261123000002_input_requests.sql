-- Input requests: an agent asks a question on a stream; a person answers it, or it expires.
-- Applied once at start-up; never edit after it has shipped, add a new file.
--
-- This row, not the log, decides "first answer wins": `status` leaves 'open' exactly once, by
-- a conditional update. The event that tells the stream (`input.answered` / `input.expired`)
-- is appended after that update commits, under an idempotency id derived from `token`, so if
-- a process dies in between, the sweeper appends it again and the log still holds it once.
create table input_requests (
    stream_id       bigint      not null references streams (id) on delete cascade,
    -- the producer's id for the request (or one the server made up); unique per stream.
    request_id      text        not null,
    -- random; part of the event ids of this request's events, so no producer can take them.
    token           text        not null,
    -- seq of `input.requested`; null until that append has returned (or the sweeper found it).
    seq             bigint,
    -- JSON values exactly as the producer sent them (text, like events.data).
    prompt          text        not null,
    schema          text,
    data            text,
    expires_at      timestamptz not null,
    -- 'open', then 'answered' or 'expired', once.
    status          text        not null default 'open'
                    check (status in ('open', 'answered', 'expired')),
    -- the winning answer's data, as sent.
    answer          text,
    resolved_at     timestamptz,
    -- true once the resolution event is in the log (or can never be: the stream closed).
    announced       boolean     not null default false,
    -- seq of the resolution event, when it was appended.
    resolution_seq  bigint,
    created_at      timestamptz not null default now(),
    primary key (stream_id, request_id)
);

-- the sweeper's scan for open requests that are due.
create index input_requests_due on input_requests (expires_at) where status = 'open';
-- the sweeper's scan for resolutions whose event a crash may have lost.
create index input_requests_unannounced on input_requests (resolved_at)
    where status <> 'open' and not announced;
