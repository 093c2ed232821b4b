#!/bin/sh
# First start of the Postgres container: per service a database and two roles, neither a
# superuser (see "Database roles" in deploy/README.md):
#   <db>_owner  owns the database and its tables; the migrate-* jobs connect as it
#               (password ${DB}_MIGRATOR_PASSWORD);
#   <db>_app    what the service and its relay connect as (password ${DB}_DB_PASSWORD):
#               CONNECT only here; every migration run grants it exactly what the service
#               needs (svckit.migrate), never UPDATE or DELETE on the ledger.
set -eu
for db in ${POSTGRES_SERVICE_DATABASES:-auth wallet}; do
  upper=$(printf '%s' "$db" | tr '[:lower:]' '[:upper:]')
  eval "owner_password=\${${upper}_MIGRATOR_PASSWORD:?set ${upper}_MIGRATOR_PASSWORD in deploy/.env}"
  eval "app_password=\${${upper}_DB_PASSWORD:?set ${upper}_DB_PASSWORD in deploy/.env}"
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v db="$db" -v owner="${db}_owner" -v app="${db}_app" \
    -v owner_password="$owner_password" -v app_password="$app_password" <<'SQL'
CREATE ROLE :"owner" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'owner_password';
CREATE ROLE :"app" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'app_password';
CREATE DATABASE :"db" OWNER :"owner";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO :"app";
\connect :"db"
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL
done
