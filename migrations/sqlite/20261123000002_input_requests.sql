-- Input requests on the embedded backend; see migrations/postgres for what each column means.
-- Times are INTEGER milliseconds since the Unix epoch, booleans INTEGER 0/1.

create table input_requests (
    stream_id       integer not null references streams (id) on delete cascade,
    request_id      text    not null,
    token           text    not null,
    seq             integer,
    prompt          text    not null,
    schema          text,
    data            text,
    expires_at      integer not null,
    status          text    not null default 'open'
                    check (status in ('open', 'answered', 'expired')),
    answer          text,
    resolved_at     integer,
    announced       integer not null default 0,
    resolution_seq  integer,
    created_at      integer not null,
    primary key (stream_id, request_id)
);

create index input_requests_due on input_requests (expires_at) where status = 'open';
create index input_requests_unannounced on input_requests (resolved_at)
    where status <> 'open' and not announced;
