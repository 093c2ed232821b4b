#!/bin/bash
# What docker-compose.yml uses of the official postgres image's entrypoint:
# - started as root, it fixes the ownership of PGDATA and runs as postgres;
# - on first start (empty PGDATA): initdb with POSTGRES_USER (default postgres) and
#   POSTGRES_PASSWORD (required unless POSTGRES_HOST_AUTH_METHOD=trust), POSTGRES_INITDB_ARGS,
#   creates POSTGRES_DB (default: the user's name), then runs /docker-entrypoint-initdb.d/*.sh
#   (executed if executable, else sourced), *.sql and *.sql.gz once, in name order;
# - then the server listens on all interfaces, password (scram-sha-256) auth over TCP,
#   trust on the local socket (as in the official image).
# Unlike the official image, the init-time server listens on a private socket only, so a
# pg_isready healthcheck does not report ready before the init scripts have finished.
set -Eeuo pipefail

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
  set -- postgres "$@"
fi
if [ "$1" != postgres ]; then
  exec "$@"
fi

if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  find "$PGDATA" \! -user postgres -exec chown postgres:postgres '{}' +
  chown postgres:postgres /var/run/postgresql
  chmod 700 "$PGDATA"
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  user="${POSTGRES_USER:-postgres}"
  db="${POSTGRES_DB:-$user}"
  method="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}"
  if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$method" != trust ]; then
    echo "error: POSTGRES_PASSWORD is not set (or set POSTGRES_HOST_AUTH_METHOD=trust)" >&2
    exit 1
  fi
  pwfile="$(mktemp)"
  printf '%s\n' "${POSTGRES_PASSWORD:-}" >"$pwfile"
  # shellcheck disable=SC2086  # POSTGRES_INITDB_ARGS is a list of options
  initdb --username="$user" --pwfile="$pwfile" --auth-local=trust --auth-host="$method" \
    ${POSTGRES_INITDB_ARGS:-} -D "$PGDATA"
  rm -f "$pwfile"
  printf '\nhost all all all %s\n' "$method" >>"$PGDATA/pg_hba.conf"
  printf "\nlisten_addresses = '*'\n" >>"$PGDATA/postgresql.conf"

  socket="$(mktemp -d)"
  pg_ctl -D "$PGDATA" -w -o "-c listen_addresses='' -c unix_socket_directories=$socket" start
  export PGHOST="$socket" PGUSER="$user" PGDATABASE=postgres
  if [ "$db" != postgres ]; then
    psql -v ON_ERROR_STOP=1 -q -c "CREATE DATABASE \"$db\""
  fi
  for f in /docker-entrypoint-initdb.d/*; do
    case "$f" in
      *.sh)
        if [ -x "$f" ]; then
          echo "running $f"
          "$f"
        else
          echo "sourcing $f"
          # shellcheck disable=SC1090
          . "$f"
        fi
        ;;
      *.sql) echo "running $f"; psql -v ON_ERROR_STOP=1 -q -d "$db" -f "$f" ;;
      *.sql.gz) echo "running $f"; gunzip -c "$f" | psql -v ON_ERROR_STOP=1 -q -d "$db" ;;
      *) [ -e "$f" ] && echo "ignoring $f" ;;
    esac
  done
  pg_ctl -D "$PGDATA" -m fast -w stop
  rm -rf "$socket"
  unset PGHOST PGUSER PGDATABASE
  echo "PostgreSQL init done; starting the server"
fi

exec "$@"
