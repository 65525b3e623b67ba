#!/usr/bin/env bash
# Mutation testing with mutmut (docs/mutation-testing.md): by hand, never in CI (hours on two
# cores). Installs the `mutation` extra into the project's .venv, then runs each AREA given
# (engine, response, audit, ingest; all four, in that order, when none is given).
#
# mutmut reads its settings from ./pyproject.toml and works in ./mutants/. Each area runs in
# its own directory, .mutation/AREA/, holding links to app/, tests/, bench/, alembic.ini and
# migrations/ and a pyproject.toml made from this one: [tool.pytest.ini_options] as it is,
# [tool.mutmut] with only_mutate and the test selection of [tool.mutation.areas.AREA]. A run
# stopped half way resumes where it was; `rm -rf .mutation/AREA` starts the area afresh.
#
# Environment: MUTATION_MAX_CHILDREN (default 1) mutants at a time; the machine is shared.
# Survivors: `cd .mutation/AREA && ../../.venv/bin/mutmut results` lists them,
# `../../.venv/bin/mutmut show NAME` shows one's diff.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="test,mutation" . scripts/_venv.sh
ROOT="$PWD"
AREAS=("$@")
[ ${#AREAS[@]} -gt 0 ] || AREAS=(engine response audit ingest)
for area in "${AREAS[@]}"; do
    work="$ROOT/.mutation/$area"
    mkdir -p "$work"
    for linked in app tests alembic.ini migrations bench; do
        ln -sfn "$ROOT/$linked" "$work/$linked"
    done
    python - "$area" "$ROOT/pyproject.toml" "$work/pyproject.toml" <<'EOF'
import json
import sys
import tomllib

area, source, target = sys.argv[1:]
with open(source, "rb") as file:
    project = tomllib.load(file)
areas = project["tool"]["mutation"]["areas"]
if area not in areas:
    sys.exit(f"unknown area {area!r}: one of {', '.join(areas)} ([tool.mutation.areas])")
mutmut = {
    **project["tool"]["mutmut"],
    "only_mutate": areas[area]["only_mutate"],
    "pytest_add_cli_args_test_selection": areas[area]["tests"],
}


def table(name: str, values: dict[str, object]) -> str:
    # Strings, lists of strings, numbers and booleans: JSON spells them as TOML does.
    return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


with open(target, "w") as file:
    file.write("# Made by scripts/mutation.sh from the project's pyproject.toml.\n")
    file.write(table("tool.pytest.ini_options", project["tool"]["pytest"]["ini_options"]))
    file.write("\n" + table("tool.mutmut", mutmut))
EOF
    # One migrated SQLite template for the area's run (tests copy it, never write it): each
    # mutant is a pytest session of its own, which would otherwise migrate one again.
    rm -f "$work/template.db"
    DATABASE_URL="sqlite:///$work/template.db" nice -n 10 python -m alembic upgrade head >/dev/null 2>&1
    echo "== mutation testing: $area"
    (cd "$work" && ITP_TEST_SQLITE_TEMPLATE="$work/template.db" \
        nice -n 10 "$ROOT/.venv/bin/mutmut" run --max-children "${MUTATION_MAX_CHILDREN:-1}")
    (cd "$work" && "$ROOT/.venv/bin/mutmut" results) || true
done
