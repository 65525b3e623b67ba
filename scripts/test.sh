#!/usr/bin/env bash
# Install everything and run the whole suite, on SQLite and on PostgreSQL (127.0.0.1:5432).
# Extra arguments go to pytest.
EXTRAS="test" . "$(dirname "$0")/_venv.sh"
ruff check app tests migrations
ruff format --check --quiet app tests migrations
mypy  # strict, on app/ (pyproject.toml [tool.mypy])
exec python -m pytest "$@"
