# One task runner, the same verbs everywhere. Each target calls the script CI and the README
# use, so there is one way to do each thing.
.PHONY: run test lint bench bench-smoke openapi mutation

run:
	bash scripts/run.sh

test:
	bash scripts/test.sh

lint:
	.venv/bin/ruff check app tests migrations bench
	.venv/bin/ruff format --check app tests migrations bench
	.venv/bin/mypy

# The full benchmark: 2,000 patients, 1,000,000 counts (generated once into itp_bench),
# 2 workers per server, 32 connections. Results go to bench/results/.
bench:
	bash scripts/bench.sh $(BENCH_ARGS)

# Seconds, at a tiny scale, in a throwaway database: that the harness runs, not its figures.
bench-smoke:
	bash scripts/bench.sh --patients 12 --counts 300 --workers 1 --connections 2 \
		--duration 1 --runs 1 --bundle-entries 20 --database itp_bench_smoke --drop \
		--out $$(mktemp -d)

openapi:
	.venv/bin/python -m app openapi

# Mutation testing, by hand, never in CI (docs/mutation-testing.md): hours on two cores.
# `make mutation AREAS=engine` runs one area; all four when AREAS is empty.
mutation:
	bash scripts/mutation.sh $(AREAS)
