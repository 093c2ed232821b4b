#!/bin/sh
# First start of the Postgres container: one database (and owner) per service.
set -eu
for db in ${POSTGRES_SERVICE_DATABASES:-auth wallet}; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -c "CREATE DATABASE \"$db\""
done
