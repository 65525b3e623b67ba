#!/usr/bin/env bash
# Install everything and run the whole suite, on SQLite and on PostgreSQL (127.0.0.1:5432).
# Extra arguments go to pytest.
EXTRAS="test" . "$(dirname "$0")/_venv.sh"
# The report page is tested in a real Chromium (Debian's: Playwright's own download cannot
# be reached); install it where it is missing and we may (root with apt). Without it the
# browser test fails in CI.
# PgBouncer (the replica test's transaction pooler) and HAProxy (the replicas profile's
# proxy, whose config the test checks with the binary) come from the system's packages too.
# Without them those tests fail in CI.
MISSING=""
[ -x "${CHROMIUM_PATH:-/usr/bin/chromium}" ] || MISSING="$MISSING chromium"
[ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null || MISSING="$MISSING pgbouncer"
[ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null || MISSING="$MISSING haproxy"
if [ -n "$MISSING" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $MISSING >/dev/null
fi
ruff check app tests migrations
ruff format --check --quiet app tests migrations
mypy  # strict, on app/ (pyproject.toml [tool.mypy])
exec python -m pytest "$@"
