-- One round trip per commit (issue 15): the appender may send its `append_jobs` call alone,
-- outside BEGIN/COMMIT, so that the call is its own transaction and commits with its answer.
-- If the connection dies during such a call the batch is in doubt like a lost COMMIT, but the
-- appender holds no answer yet: so the commit token now records the function's answer, and
-- the lookup that finds the token (src/log/store.rs `commit_outcome`) returns it. Tokens
-- written before this migration, or by the explicit-transaction path, are read the same way.
-- Applied once at start-up; never edit after it has shipped, add a new file.

alter table commit_tokens
    add column seqs bigint[],
    add column dups boolean[],
    add column errors text[],
    add column error_heads bigint[],
    add column written_streams text[],
    add column written_heads bigint[],
    add column written_closed boolean[];

-- The function of 20261128000006_append.sql with two changes: the token row carries the
-- answer, and a lone job of id-less events that does not close its stream (the token path:
-- one event per commit under light load) locks, checks and moves its stream's head with one
-- UPDATE instead of a locking SELECT and an UPDATE, and skips the set-up of the general path.
-- Same arguments, results and rules; `create or replace` keeps its owner and grants, but not
-- its settings, so the search_path is fixed again below.
create or replace function tailcast.append_jobs(
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
    e_by text[] default null,
    e_append boolean[] default null,
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
    one_sid bigint;
begin
    if n_jobs = 0 then
        return;
    end if;

    -- The common case, one job of events without ids that does not close its stream, takes
    -- the row lock, checks and moves the head in one UPDATE. If it matches no row (the stream
    -- is missing or closed, or `expected_seq` is not its head), nothing was locked or written
    -- and the general path below decides.
    with_ids := cardinality(array_remove(e_id, null)) > 0;
    if n_jobs = 1 and not with_ids and not j_close[1] and n_ev > 0 and j_count[1] = n_ev then
        update streams set head = head + n_ev, updated_at = p_time
         where name = j_stream[1] and not closed
           and (j_expected[1] is null or head = j_expected[1])
        returning id, head into one_sid, h;
        if found then
            seqs := array(select generate_series(h - n_ev + 1, h));
            dups := array_fill(false, array[n_ev]);
            errors := array[null::text];
            error_heads := array[null::bigint];
            written_streams := j_stream;
            written_heads := array[h];
            written_closed := array[false];
            insert into events (stream_id, seq, type, data, event_id, key, time, body, "by",
                                append)
            select one_sid, h - n_ev + t.o, t.ty, t.data, null, t.k, p_time, t.b, t.w, t.a
              from unnest(e_type, e_data, e_key,
                          coalesce(e_body, array_fill(null::bytea, array[n_ev])),
                          coalesce(e_by, array_fill(null::text, array[n_ev])),
                          coalesce(e_append, array_fill(false, array[n_ev])))
                   with ordinality as t(ty, data, k, b, w, a, o);
            with mark as (
                insert into commit_tokens (token, seqs, dups, errors, error_heads,
                                           written_streams, written_heads, written_closed)
                select p_token, seqs, dups, errors, error_heads, written_streams,
                       written_heads, written_closed
                 where p_token is not null
            )
            select count(*) into locked
              from (select pg_notify('tailcast_appends',
                                     p_node || E'\n' || j_stream[1] || ' ' || h)) as sent;
            return;
        end if;
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

    insert into events (stream_id, seq, type, data, event_id, key, time, body, "by",
                        append)
    select s_id[j_sidx[t.j]], t.seq, t.ty, t.data, t.eid, t.k, p_time, t.b, t.w, t.a
      from unnest(e_job, seqs, dups, e_type, e_data, e_id, e_key,
                  coalesce(e_body, array_fill(null::bytea, array[n_ev])),
                  coalesce(e_by, array_fill(null::text, array[n_ev])),
                  coalesce(e_append, array_fill(false, array[n_ev])))
           as t(j, seq, dup, ty, data, eid, k, b, w, a)
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
        with mark as (
            insert into commit_tokens (token, seqs, dups, errors, error_heads, written_streams,
                                       written_heads, written_closed)
            select p_token, seqs, dups, errors, error_heads, written_streams, written_heads,
                   written_closed
             where p_token is not null
        )
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
             boolean[], text[], text[], text[], text[], bytea[], text[], boolean[])
             set search_path = %I, pg_temp',
        current_schema());
end;
$$;
