-- `tailcast.append` and `tailcast.append_many` take the append flag (issue 24): an event with a
-- `key` and `append` true extends the message its key names, as over HTTP (`"append": true`).
-- Applied once at start-up; never edit after it has shipped, add a new file.
--
-- A new argument list is a new function in PostgreSQL, and one with a defaulted argument more
-- would make every call with the old arguments ambiguous between the two: the old functions
-- are dropped and created again with the flag last, defaulting to false (null: false), so every
-- call written for 20261128000003_sql_append.sql means what it meant. Dropping them drops their
-- grants: tailcast_writer's are given again below.
--
-- `by` (the author, 20261128000004_presence.sql): an application's transaction has no tailcast
-- principal, so these functions write none (null), as before; a compacted read never folds
-- such an event into a run of an authenticated author's (a folded event names one author).

drop function tailcast.append(text, text, json, text, text, bigint);
drop function tailcast.append_many(text, text[], json[], text[], text[], bigint);

-- The checks of `check_event`, and: `append` needs a `key` (TC002 invalid_event).
create function tailcast.append_many(
    stream text,
    types text[],
    data json[],
    ids text[] default null,
    keys text[] default null,
    expected_seq bigint default null,
    appends boolean[] default null
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
       or coalesce(cardinality(keys), n) <> n or coalesce(cardinality(appends), n) <> n then
        raise exception
            'invalid_event: types, data, ids, keys and appends must have one element per event'
            using errcode = 'TC002';
    end if;
    for i in 1 .. n loop
        perform tailcast.check_event(stream, coalesce(types[i], 'message'), ids[i], keys[i]);
        if coalesce(appends[i], false) and keys[i] is null then
            raise exception 'invalid_event: `append` needs a `key`: it names the message the event extends'
                using errcode = 'TC002';
        end if;
    end loop;
    select * into r from tailcast.append_jobs(
        '', null, date_trunc('milliseconds', clock_timestamp()),
        array[stream], array[n], array[expected_seq], array[false],
        array(select coalesce(t, 'message')
                from unnest(coalesce(types, array_fill(null::text, array[n]))) as u(t)),
        array(select coalesce(d::text, 'null') from unnest(data) as u(d)),
        coalesce(ids, array_fill(null::text, array[n])),
        coalesce(keys, array_fill(null::text, array[n])),
        null,
        null,
        case when appends is null then null
             else array(select coalesce(a, false) from unnest(appends) as u(a)) end);
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
    expected_seq bigint default null,
    append boolean default false
)
returns bigint
language sql
security definer
as $$
    select (tailcast.append_many(stream, array[type], array[data], array[id], array[key],
                                 expected_seq, array[append]))[1];
$$;

do $$
begin
    execute format('alter function tailcast.append_many(text, text[], json[], text[], text[],
                        bigint, boolean[]) set search_path = %I, pg_temp', current_schema());
    execute format('alter function tailcast.append(text, text, json, text, text, bigint, boolean)
                        set search_path = %I, pg_temp', current_schema());
end;
$$;

revoke execute on function tailcast.append(text, text, json, text, text, bigint, boolean),
    tailcast.append_many(text, text[], json[], text[], text[], bigint, boolean[]) from public;
do $$
begin
    if exists (select 1 from pg_roles where rolname = 'tailcast_writer') then
        grant execute on function tailcast.append(text, text, json, text, text, bigint, boolean),
            tailcast.append_many(text, text[], json[], text[], text[], bigint, boolean[])
            to tailcast_writer;
    end if;
end;
$$;
