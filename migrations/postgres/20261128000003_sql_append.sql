-- Appending in SQL: one implementation of the append rules, used by tailcast's own appender
-- (one round trip per group commit) and by applications inside their own transactions.
-- Applied once at start-up; never edit after it has shipped, add a new file.
--
-- `tailcast.append_jobs` is the appender's: a whole batch of append jobs as arrays. It locks
-- the streams, assigns seqs, de-duplicates ids, inserts, moves the heads, sends the one NOTIFY
-- and records the commit token; the caller then commits. `tailcast.append` and
-- `tailcast.append_many` are the applications': they validate like the HTTP path, call it
-- with one job, and raise an error (SQLSTATE class TC, message starting with the code the
-- HTTP API uses) instead of returning a refusal.
--
-- The stream row lock taken here is held until the caller's transaction ends: that is what
-- keeps seqs gap-free and commit order equal to seq order, and why a rollback leaves no gap.

create schema if not exists tailcast;

-- Arguments (one element per job for j_*, one per event for e_*, the events of job 1 first):
--   p_node      first line of the NOTIFY payload: the node whose hub already has the events
--               (its listener skips them); anything else makes every node read the log.
--   p_token     commit token inserted into commit_tokens if the batch wrote anything (null:
--               none), so that a commit whose connection died can be looked up by its data.
--   p_time      the `time` of every inserted event (and of streams created here).
--   j_stream    stream name of each job (validated by the caller).
--   j_count     number of events of each job (at least 1).
--   j_expected  append only if the stream's head is this (null: any head).
--   j_close     the job closes the stream (its one event is `stream.closed`).
--   e_type, e_data, e_id, e_key: the events (validated by the caller; data as JSON text).
--   e_body      per event: its byte payload (events.body, a Durable Streams byte-mode
--               append), or null; null for the whole array when no event has one.
-- Results:
--   seqs        per event: its seq (a duplicate's: the original's); null if its job was refused.
--   dups        per event: true if it was a duplicate (nothing written for it).
--   errors      per job: null, 'stream_closed' or 'seq_conflict'.
--   error_heads per job: the stream's head when the job was refused.
--   written_streams, written_heads, written_closed: every stream written to, with its new
--               head and closed flag.
create function tailcast.append_jobs(
    p_node text,
    p_token uuid,
    p_time timestamptz,
    j_stream text[],
    j_count int[],
    j_expected bigint[],
    j_close boolean[],
    e_type text[],
    e_data text[],
    e_id text[],
    e_key text[],
    e_body bytea[] default null,
    out seqs bigint[],
    out dups boolean[],
    out errors text[],
    out error_heads bigint[],
    out written_streams text[],
    out written_heads bigint[],
    out written_closed boolean[]
)
language plpgsql
as $$
declare
    n_jobs int := coalesce(array_length(j_stream, 1), 0);
    n_ev int := coalesce(array_length(e_type, 1), 0);
    names text[];
    created bigint[];
    -- per stream, in `names` order
    s_id bigint[];
    s_head bigint[];
    s_closed boolean[];
    s_written boolean[];
    -- per job
    j_sidx int[];
    j_start int[];
    j_base bigint[];
    -- per event
    e_job int[];
    e_log bigint[];
    e_prev int[];
    with_ids boolean;
    j int;
    e int;
    p int;
    si int;
    h bigint;
    fresh bigint;
    prior bigint;
    locked int;
begin
    if n_jobs = 0 then
        return;
    end if;
    -- (A lone job, the common case under light load, skips the set-up queries.)
    if n_jobs = 1 then
        names := j_stream;
    else
        names := array(select n from (select distinct n from unnest(j_stream) as t(n)) as d
                        order by n collate "C");
    end if;

    -- Lock the rows in name order, so that two batches sharing streams (on any nodes) cannot
    -- deadlock, creating the missing ones. A concurrent creator may win an insert (`do
    -- nothing` then leaves its row, which the select waits for) and may drop its row again if
    -- nothing was written to it: then the row is still missing and the loop creates it.
    created := '{}';
    loop
        select array_agg(s.id order by s.name), array_agg(s.head order by s.name),
               array_agg(s.closed order by s.name), count(*)
          into s_id, s_head, s_closed, locked
          from (select id, name, head, closed from streams
                 where name = any(names) order by name for update) as s;
        exit when locked = array_length(names, 1);
        with ins as (
            insert into streams (name, created_at, updated_at)
            select n, p_time, p_time from unnest(names) as t(n)
             where not exists (select 1 from streams where name = t.n)
             order by n collate "C"
            on conflict (name) do nothing
            returning id
        )
        select created || coalesce(array_agg(id), '{}') into created from ins;
    end loop;
    s_written := array_fill(false, array[array_length(names, 1)]);

    if n_jobs = 1 then
        j_sidx := array[1];
        j_start := array[1];
        e_job := array_fill(1, array[n_ev]);
    else
        select array_agg(u.i order by t.i) into j_sidx
          from unnest(j_stream) with ordinality as t(n, i)
          join unnest(names) with ordinality as u(n, i) on u.n = t.n;
        select array_agg(t.s order by t.i) into j_start
          from (select i, (sum(c) over (order by i) - c + 1)::int as s
                  from unnest(j_count) with ordinality as t(c, i)) as t;
        select array_agg(t.i order by t.i, g) into e_job
          from unnest(j_count) with ordinality as t(c, i), generate_series(1, t.c) as g;
    end if;
    j_base := array_fill(null::bigint, array[n_jobs]);
    errors := array_fill(null::text, array[n_jobs]);
    error_heads := array_fill(null::bigint, array[n_jobs]);

    with_ids := cardinality(array_remove(e_id, null)) > 0;
    if with_ids then
        -- For each event with an id: its seq if the log holds the id already, and the previous
        -- event of the batch with the same stream and id (the chain later events walk back).
        select array_agg(l.seq order by x.o), array_agg(x.prev order by x.o)
          into e_log, e_prev
          from (select o, sid, eid,
                       case when eid is not null
                            then lag(o) over (partition by sid, eid order by o) end as prev
                  from (select t.o, s_id[j_sidx[e_job[t.o::int]]] as sid, t.eid
                          from unnest(e_id) with ordinality as t(eid, o)) as y) as x
          left join events l on l.stream_id = x.sid and l.event_id = x.eid;
        seqs := array_fill(null::bigint, array[n_ev]);
        dups := array_fill(null::boolean, array[n_ev]);
    end if;

    -- Decide the jobs in order; each sees the state the jobs before it left.
    for j in 1 .. n_jobs loop
        si := j_sidx[j];
        h := s_head[si];
        if j_close[j] and s_closed[si] then
            -- Closing a closed stream: an idempotent duplicate, answered with the head.
            if not with_ids then
                seqs := coalesce(seqs, array_fill(null::bigint, array[n_ev]));
                dups := coalesce(dups, array_fill(null::boolean, array[n_ev]));
            end if;
            for e in j_start[j] .. j_start[j] + j_count[j] - 1 loop
                seqs[e] := h;
                dups[e] := true;
            end loop;
            j_base[j] := -1;
            continue;
        end if;
        if with_ids then
            -- Duplicates of the log, of earlier jobs of this batch (the nearest earlier event
            -- with the id whose job was not refused) and of earlier events of this job.
            fresh := 0;
            for e in j_start[j] .. j_start[j] + j_count[j] - 1 loop
                prior := e_log[e];
                if prior is null then
                    p := e_prev[e];
                    while p is not null loop
                        prior := seqs[p];
                        exit when prior is not null;
                        p := e_prev[p];
                    end loop;
                end if;
                if prior is null then
                    fresh := fresh + 1;
                    seqs[e] := h + fresh;
                    dups[e] := false;
                else
                    seqs[e] := prior;
                    dups[e] := true;
                end if;
            end loop;
        else
            fresh := j_count[j];
        end if;
        -- A retry of an append that already succeeded is all duplicates: it succeeds even
        -- though the head moved past `expected_seq` or the stream was closed since.
        if fresh > 0 and (s_closed[si] or j_expected[j] <> h) then
            errors[j] := case when s_closed[si] then 'stream_closed' else 'seq_conflict' end;
            error_heads[j] := h;
            if with_ids then
                for e in j_start[j] .. j_start[j] + j_count[j] - 1 loop
                    seqs[e] := null;
                    dups[e] := null;
                end loop;
            end if;
            continue;
        end if;
        j_base[j] := h;
        if fresh > 0 then
            s_head[si] := h + fresh;
            s_written[si] := true;
            s_closed[si] := s_closed[si] or j_close[j];
        end if;
    end loop;

    if not with_ids then
        -- No duplicates possible: an accepted job's events take the seqs after its base.
        seqs := coalesce(seqs, array_fill(null::bigint, array[n_ev]));
        dups := coalesce(dups, array_fill(null::boolean, array[n_ev]));
        for j in 1 .. n_jobs loop
            if j_base[j] >= 0 then
                for e in j_start[j] .. j_start[j] + j_count[j] - 1 loop
                    seqs[e] := j_base[j] + (e - j_start[j] + 1);
                    dups[e] := false;
                end loop;
            end if;
        end loop;
    end if;

    insert into events (stream_id, seq, type, data, event_id, key, time, body)
    select s_id[j_sidx[t.j]], t.seq, t.ty, t.data, t.eid, t.k, p_time, t.b
      from unnest(e_job, seqs, dups, e_type, e_data, e_id, e_key,
                  coalesce(e_body, array_fill(null::bytea, array[n_ev])))
           as t(j, seq, dup, ty, data, eid, k, b)
     where not t.dup;

    written_streams := '{}';
    written_heads := '{}';
    written_closed := '{}';
    for si in 1 .. cardinality(names) loop
        if s_written[si] then
            written_streams := written_streams || names[si];
            written_heads := written_heads || s_head[si];
            written_closed := written_closed || s_closed[si];
        end if;
    end loop;

    if cardinality(written_streams) > 0 then
        update streams s set head = t.hd, closed = t.c, updated_at = p_time
          from unnest(s_id, s_head, s_closed, s_written) as t(id, hd, c, w)
         where t.w and s.id = t.id;
        -- One notification per batch (never per event: NOTIFY serialises commits on a global
        -- lock): `node\nstream head\n…`, split to stay under pg_notify's 8000 bytes.
        -- (One statement with the token: a data-modifying CTE always runs.)
        with mark as (insert into commit_tokens (token) select p_token where p_token is not null)
        select count(*) into locked from (
            select pg_notify('tailcast_appends', p_node || string_agg(line, '' order by i))
              from (select i, E'\n' || n || ' ' || hd as line,
                           (sum(length(n) + 22) over (order by i) - length(n) - 22) / 6000
                           as chunk
                      from unnest(written_streams, written_heads) with ordinality
                           as t(n, hd, i)) as l
             group by chunk) as sent;
    end if;

    -- Streams created here that no job wrote to leave nothing behind.
    if cardinality(created) > 0 then
        delete from streams where id = any(created) and head = 0;
    end if;
end;
$$;

-- Fixed at creation: the schema the log's tables are in, then pg_temp last, so that no
-- caller's objects (temporary or in other schemas) can stand in for ours.
do $$
begin
    execute format(
        'alter function tailcast.append_jobs(text, uuid, timestamptz, text[], int[], bigint[],
             boolean[], text[], text[], text[], text[], bytea[]) set search_path = %I, pg_temp',
        current_schema());
end;
$$;

-- The checks of the HTTP path (StreamName::parse, parse_event_type, parse_label), raising
-- with SQLSTATE TC001 invalid_stream_name, TC002 invalid_event, TC003 reserved_type.
create function tailcast.check_event(stream text, type text, id text, key text)
returns void
language plpgsql
immutable
as $$
begin
    if stream is null or stream !~ '^[A-Za-z0-9_.:@-]{1,200}$' then
        raise exception 'invalid_stream_name: % is not 1-200 characters of A-Z a-z 0-9 _ . : @ -',
            coalesce(quote_literal(left(stream, 64)), 'null')
            using errcode = 'TC001';
    end if;
    if length(type) not between 1 and 128 or type ~ '[\u0001-\u001f\u007f-\u009f]' then
        raise exception 'invalid_event: `type` must be 1-128 characters without control characters'
            using errcode = 'TC002';
    end if;
    if type in ('stream.closed', 'input.requested', 'input.answered', 'input.expired',
                'control.stop') then
        raise exception 'reserved_type: % is written by the server only', quote_literal(type)
            using errcode = 'TC003';
    end if;
    if length(id) not between 1 and 256 or id ~ '[\u0001-\u001f\u007f-\u009f]' then
        raise exception 'invalid_event: `id` must be 1-256 characters without control characters'
            using errcode = 'TC002';
    end if;
    if length(key) not between 1 and 256 or key ~ '[\u0001-\u001f\u007f-\u009f]' then
        raise exception 'invalid_event: `key` must be 1-256 characters without control characters'
            using errcode = 'TC002';
    end if;
end;
$$;

-- Appends events to one stream, all or nothing, in the caller's transaction; returns each
-- event's seq (for an id the stream already holds: the original seq). `data` is stored as
-- its JSON text, byte for byte (SQL null: JSON null); `type` null means `message`.
-- Raises TC004 stream_closed, TC005 seq_conflict (`expected_seq` is not the head).
create function tailcast.append_many(
    stream text,
    types text[],
    data json[],
    ids text[] default null,
    keys text[] default null,
    expected_seq bigint default null
)
returns bigint[]
language plpgsql
security definer
as $$
declare
    n int := coalesce(cardinality(data), 0);
    r record;
begin
    if n = 0 then
        raise exception 'empty_batch: no events to append' using errcode = 'TC006';
    end if;
    if coalesce(cardinality(types), n) <> n or coalesce(cardinality(ids), n) <> n
       or coalesce(cardinality(keys), n) <> n then
        raise exception 'invalid_event: types, data, ids and keys must have one element per event'
            using errcode = 'TC002';
    end if;
    for i in 1 .. n loop
        perform tailcast.check_event(stream, coalesce(types[i], 'message'), ids[i], keys[i]);
    end loop;
    select * into r from tailcast.append_jobs(
        '', null, date_trunc('milliseconds', clock_timestamp()),
        array[stream], array[n], array[expected_seq], array[false],
        array(select coalesce(t, 'message')
                from unnest(coalesce(types, array_fill(null::text, array[n]))) as u(t)),
        array(select coalesce(d::text, 'null') from unnest(data) as u(d)),
        coalesce(ids, array_fill(null::text, array[n])),
        coalesce(keys, array_fill(null::text, array[n])));
    if r.errors[1] = 'stream_closed' then
        raise exception 'stream_closed: stream % is closed (head %)', quote_literal(stream),
            r.error_heads[1]
            using errcode = 'TC004';
    elsif r.errors[1] = 'seq_conflict' then
        raise exception 'seq_conflict: expected_seq is %, the head of % is %', expected_seq,
            quote_literal(stream), r.error_heads[1]
            using errcode = 'TC005';
    end if;
    return r.seqs;
end;
$$;

-- One event; returns its seq. The same rules and errors as `append_many`.
create function tailcast.append(
    stream text,
    type text,
    data json,
    id text default null,
    key text default null,
    expected_seq bigint default null
)
returns bigint
language sql
security definer
as $$
    select (tailcast.append_many(stream, array[type], array[data], array[id], array[key],
                                 expected_seq))[1];
$$;

do $$
begin
    execute format('alter function tailcast.check_event(text, text, text, text)
                        set search_path = %I, pg_temp', current_schema());
    execute format('alter function tailcast.append_many(text, text[], json[], text[], text[], bigint)
                        set search_path = %I, pg_temp', current_schema());
    execute format('alter function tailcast.append(text, text, json, text, text, bigint)
                        set search_path = %I, pg_temp', current_schema());
end;
$$;

-- Applications call the functions as `tailcast_writer` (grant it to their login role), which
-- may execute `append` and `append_many` and nothing else: no table privileges, not the
-- appender's `append_jobs` (which can close streams and choose times). Roles belong to the
-- whole server: created once, here if the migrating role may (otherwise see the README).
do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'tailcast_writer') then
        begin
            create role tailcast_writer nologin;
        exception
            -- another database's migration created it meanwhile
            when duplicate_object or unique_violation then null;
            when insufficient_privilege then
                raise notice 'tailcast_writer not created (no CREATEROLE): see the README';
        end;
    end if;
end;
$$;

revoke all on schema tailcast from public;
revoke execute on all functions in schema tailcast from public;
do $$
begin
    if exists (select 1 from pg_roles where rolname = 'tailcast_writer') then
        grant usage on schema tailcast to tailcast_writer;
        grant execute on function tailcast.append(text, text, json, text, text, bigint),
            tailcast.append_many(text, text[], json[], text[], text[], bigint)
            to tailcast_writer;
    end if;
end;
$$;
