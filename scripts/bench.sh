#!/usr/bin/env bash
# Install everything (the `bench` extra: profilers) and run the benchmark harness against the
# PostgreSQL at 127.0.0.1:5432 (override with BENCH_ADMIN_DSN). Arguments go to
# `python -m bench` (e.g. --patients 200 --counts 20000 --duration 5). See bench/README.md.
# The load generator is wrk when installed (`apt-get install -y wrk`), else a Python one.
EXTRAS="bench" . "$(dirname "$0")/_venv.sh"
exec python -m bench "$@"
