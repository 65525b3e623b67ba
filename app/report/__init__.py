"""The trial at a glance: statistics and pictures computed from per-patient data.

Pure functions (no database, no HTTP, no clock): `statistics` with scipy, `plots` with
matplotlib. `app.services.report` gathers the data and calls them.
"""
