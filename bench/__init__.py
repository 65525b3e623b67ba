"""The benchmark harness (issue 8): `python -m bench` or `make bench`.

It generates a synthetic trial in PostgreSQL, starts the API and a bare ceiling server on
loopback, drives both with one load generator and writes Markdown and JSON results to
`bench/results/`. Tests never time anything; this package prints figures.
"""
