-- Stream leases and webhooks on the embedded backend; see migrations/postgres for what each
-- column means. Times are INTEGER milliseconds since the Unix epoch.

alter table streams add column lease_s integer;
alter table streams add column heartbeat_at integer;

create index streams_leased on streams (id) where lease_s is not null and not closed;

create table webhooks (
    id          text    primary key,
    url         text    not null,
    prefix      text    not null,
    types       text,
    secret      text    not null,
    created_at  integer not null
);

create table webhook_positions (
    webhook_id      text    not null references webhooks (id) on delete cascade,
    stream_id       integer not null references streams (id) on delete cascade,
    delivered       integer not null,
    owner           text,
    lease_until     integer,
    attempts        integer not null default 0,
    last_error      text,
    primary key (webhook_id, stream_id)
);

create index webhook_positions_stream on webhook_positions (stream_id);
