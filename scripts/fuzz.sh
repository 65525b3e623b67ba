#!/usr/bin/env bash
# Fuzz the API by hand with schemathesis (pinned in the test extras): a real uvicorn on a
# fresh SQLite file, the app's own openapi/openapi.json, every check, a fixed seed.
# Every check is on by default; `--checks all` would override the per-operation settings
# of tests/fuzz/schemathesis.toml, so it is not passed.
# The test command runs it too, bounded, on both databases (tests/test_fuzz.py).
# Extra arguments go to `schemathesis run` (e.g. --max-time 600, -n 100).
EXTRAS="test" . "$(dirname "$0")/_venv.sh"
work=$(mktemp -d)
port=${FUZZ_PORT:-8765}
secret="fuzz-only-shared-secret-$(python -c 'import secrets; print(secrets.token_hex(16))')"
export DATABASE_URL="sqlite:///$work/fuzz.db" APP_ENVIRONMENT=test APP_AUTH_JWT_SECRET="$secret"
alembic upgrade head >/dev/null
uvicorn app.main:app --host 127.0.0.1 --port "$port" --log-level warning >"$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
export FUZZ_BASE_URL="http://127.0.0.1:$port" SCHEMATHESIS_HOOKS=tests.fuzz.hooks
FUZZ_TOKEN=$(python -m app token --role admin --sites S01 --sub fuzz-fixture)
export FUZZ_TOKEN
# Who the fuzzer calls the API as: two investigators of different sites (peers for
# object_level_authorization) and an admin, in a Web Fuzzing Commons document.
export FUZZ_WFC_FILE="$work/identities.json"
python -m tests.fuzz.identities "$FUZZ_WFC_FILE"
schemathesis --config-file ${FUZZ_CONFIG:-tests/fuzz/schemathesis.toml} run "$FUZZ_BASE_URL/openapi.json" \
    --seed 1 --generation-database none --max-time 240 "$@"
