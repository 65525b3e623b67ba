"""The leaf of the import graph: what every layer shares (FHIR date grammar, the error
hierarchy, code systems and kind strings, input limits, the request's identity for logs and
audit). Nothing here imports another `app` package (tests/test_architecture.py)."""
