#!/usr/bin/env bash
# Install everything, apply the migrations (SQLite by default) and serve on 127.0.0.1:8000.
EXTRAS="" . "$(dirname "$0")/_venv.sh"
export DATABASE_URL="${DATABASE_URL:-sqlite:///data/itp-trial.db}"
alembic upgrade head
exec uvicorn app.main:app --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
