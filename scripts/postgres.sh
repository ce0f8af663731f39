# Sourced by scripts/test and bench/run: makes sure a PostgreSQL server is
# reachable and exports DATABASE_URL for it (the server's admin database; tests create their
# own databases).
#
# Order: DATABASE_URL if it answers; else 127.0.0.1:5432; else start an installed cluster;
# else (as root) install Debian's postgresql; else stop, saying what to do.

pg_answers() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

pg_url_host_port() { # url -> "host port"
  local rest=${1#*://}; rest=${rest#*@}; rest=${rest%%/*}; rest=${rest%%\?*}
  local host=${rest%%:*} port=5432
  [[ $rest == *:* ]] && port=${rest##*:}
  echo "${host:-127.0.0.1} $port"
}

pg_start_cluster() {
  command -v pg_lsclusters >/dev/null 2>&1 || return 1
  local line ver name
  line=$(pg_lsclusters --no-header 2>/dev/null | head -1) || return 1
  [[ -n $line ]] || return 1
  read -r ver name _ <<<"$line"
  echo "tailcast: starting PostgreSQL cluster $ver/$name" >&2
  pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start 2>&1 | sed 's/^/  /' >&2 || true
  for _ in $(seq 1 50); do pg_answers 127.0.0.1 5432 && return 0; sleep 0.2; done
  return 1
}

pg_install() {
  [[ $(id -u) -eq 0 ]] || return 1
  command -v apt-get >/dev/null 2>&1 || return 1
  echo "tailcast: installing PostgreSQL from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2 || return 1
  pg_start_cluster || return 1
  # Debian's cluster asks for a password over TCP: give the postgres role one we know.
  su postgres -c "psql -qc \"alter role postgres password 'postgres'\"" >&2 || return 1
  export DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/postgres
}

ensure_postgres() {
  if [[ -n ${DATABASE_URL:-} ]]; then
    # shellcheck disable=SC2046
    if pg_answers $(pg_url_host_port "$DATABASE_URL"); then return 0; fi
    echo "tailcast: DATABASE_URL does not answer; trying the local server" >&2
  fi
  if pg_answers 127.0.0.1 5432 || pg_start_cluster; then
    export DATABASE_URL=${PG_LOCAL_URL:-postgres://postgres@127.0.0.1:5432/postgres}
    if [[ -z ${PG_LOCAL_URL:-} ]] && command -v psql >/dev/null 2>&1 \
      && ! psql "$DATABASE_URL" -qtAc 'select 1' >/dev/null 2>&1; then
      # Not trust auth: fall back to the password pg_install sets.
      export DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/postgres
    fi
    return 0
  fi
  if pg_install; then return 0; fi
  cat >&2 <<'MSG'
tailcast: no PostgreSQL server is reachable, and none could be started or installed.
  Start one on 127.0.0.1:5432 (user postgres), or set DATABASE_URL to a server whose user
  may create databases, or run this script as root on Debian to install one.
MSG
  return 1
}

# The crash tests (tests/api/durability.rs, frozen node) start private clusters of their own
# with initdb/pg_ctl from /usr/lib/postgresql/*/bin, whatever server DATABASE_URL points at.
# Makes sure those binaries exist (installing Debian's postgresql as root if not), and tells
# the tests a missing one is a failure, not a skip.
ensure_postgres_binaries() {
  export TAILCAST_REQUIRE_PG_BINARIES=1
  if compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null; then return 0; fi
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "tailcast: installing Debian's postgresql (the crash tests run private clusters)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2 && return 0
  fi
  echo "tailcast: no PostgreSQL server binaries under /usr/lib/postgresql/*/bin; install postgresql" >&2
  return 1
}
