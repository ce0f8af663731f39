-- The Durable Streams surface on the embedded backend; see migrations/postgres for what each
-- column means. Times are INTEGER milliseconds since the Unix epoch, booleans INTEGER 0/1.

alter table events add column body blob;

create table ds_streams (
    name          text    primary key,
    content_type  text    not null,
    ttl_s         integer,
    expires_at    integer,
    fork_of       text,
    fork_seq      integer,
    fork_sub      integer,
    deleted       integer not null default 0,
    writer_seq    text,
    closed_by     text,
    accessed_at   integer not null,
    created_at    integer not null
);

create index ds_streams_fork_of on ds_streams (fork_of) where fork_of is not null;

create table ds_producers (
    name          text    not null,
    producer_id   text    not null,
    epoch         integer not null,
    seq           integer not null,
    primary key (name, producer_id)
);
