#!/usr/bin/env bash
# First start of the compose stack's PostgreSQL (docker-entrypoint-initdb.d): the
# least-privilege roles of deploy/postgres/roles.sql, with passwords from the environment.
set -euo pipefail
: "${DB_OWNER_PASSWORD:?}" "${DB_APP_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v owner_password="'${DB_OWNER_PASSWORD}'" -v app_password="'${DB_APP_PASSWORD}'" \
    -f /etc/etrm/roles.sql
