-- Authorship and presence. Applied once at start-up; never edit after it has shipped, add a
-- new file.

-- Authorship: the token `sub` of the principal that appended an event (README "Auth and
-- limits"), null for anonymous appends and for appends through `tailcast.append` (an
-- application's own transaction has no tailcast principal). Part of the envelope as `by`,
-- stored so that replay is byte-identical to live delivery.
alter table events add column "by" text;

-- Who answered an input request (their token's `sub`): `input.answered` carries it, also when
-- the sweeper re-announces an answer whose event a crash lost.
alter table input_requests add column answered_by text;

-- Presence: who follows each stream right now, on every node (README "Presence"). Not part
-- of the log and not worth a WAL record: unlogged (emptied by a crash, not replicated), and
-- every node rewrites its own rows whenever it (re)registers.
--
-- One row per node, whose lease the node renews every few seconds. A node whose lease has
-- lapsed (it died, froze, or lost the database) is no longer anyone's business: reads ignore
-- its members and any node reaps them.
create unlogged table presence_nodes (
    node         text        primary key collate "C",
    lease_until  timestamptz not null
);

-- One row per subscription: a connection (one SSE response, one WebSocket) following a
-- stream. Written in batches by each node's presence writer, never per connection.
create unlogged table presence (
    stream      text        not null collate "C",
    node        text        not null collate "C",
    connection  text        not null collate "C",
    -- sse, ws, ui (the AI SDK view) or durable (Durable Streams SSE)
    transport   text        not null,
    -- the follower's token `sub` (null: anonymous, or a token without one)
    sub         text,
    -- a label the client gave (`label=`), null if none
    label       text,
    since       timestamptz not null,
    primary key (stream, node, connection)
);

-- a node's own rows (rewrites, reaping).
create index presence_by_node on presence (node);

-- `tailcast.append_jobs` takes each event's author as `e_by`: see 20261128000006_append.sql,
-- which redefines the function once for both new columns ("by" and append).
