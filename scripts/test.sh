#!/usr/bin/env bash
# Install everything and run the whole suite, on SQLite and on PostgreSQL (127.0.0.1:5432).
# Extra arguments go to pytest.
EXTRAS="test" . "$(dirname "$0")/_venv.sh"
# The report page is tested in a real Chromium (Debian's: Playwright's own download cannot
# be reached); install it where it is missing and we may (root with apt). Without it the
# browser test fails in CI.
if [ ! -x "${CHROMIUM_PATH:-/usr/bin/chromium}" ] && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
ruff check app tests migrations
ruff format --check --quiet app tests migrations
mypy  # strict, on app/ (pyproject.toml [tool.mypy])
exec python -m pytest "$@"
