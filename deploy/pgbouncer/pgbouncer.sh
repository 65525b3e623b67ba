#!/bin/sh
# PgBouncer in transaction pooling mode, configured from the environment: writes its config
# and user list, then runs it in the foreground. The image of docker-compose.yml's
# `replicas` profile runs this, and so do the replica test and the benchmark (bench/proxies.py),
# so what is tested is what is deployed. Nothing secret is in a file of the repository: the
# password arrives in DB_PASSWORD and is written, readable by PgBouncer's user only, where
# PgBouncer reads it.
#
# DB_HOST, DB_PORT (5432), DB_USER, DB_PASSWORD: the PostgreSQL server and the account the
#   app logs in with (clients authenticate to PgBouncer with the same name and password,
#   SCRAM-SHA-256; PgBouncer logs in to PostgreSQL with them).
# LISTEN_ADDR (0.0.0.0), LISTEN_PORT (6432); POOL_SIZE (20): server connections per database
#   and user, whatever the number of clients; MAX_CLIENT_CONN (1000);
# PGBOUNCER_DIR (/etc/pgbouncer): where the config is written.
#
# The app must know it talks to a transaction pooler: DATABASE_URL=...?pgbouncer=true.
set -eu
: "${DB_HOST:?set DB_HOST}" "${DB_USER:?set DB_USER}" "${DB_PASSWORD:?set DB_PASSWORD}"
dir="${PGBOUNCER_DIR:-/etc/pgbouncer}"
umask 077
cat >"$dir/pgbouncer.ini" <<INI
[databases]
* = host=$DB_HOST port=${DB_PORT:-5432}

[pgbouncer]
listen_addr = ${LISTEN_ADDR:-0.0.0.0}
listen_port = ${LISTEN_PORT:-6432}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = ${POOL_SIZE:-20}
max_client_conn = ${MAX_CLIENT_CONN:-1000}
; What asyncpg and psql put in their startup packet without a pooler-side meaning.
ignore_startup_parameters = extra_float_digits,application_name
INI
printf '"%s" "%s"\n' "$DB_USER" "$DB_PASSWORD" >"$dir/userlist.txt"
exec "${PGBOUNCER:-pgbouncer}" "$dir/pgbouncer.ini"
