"""ITP trial data API: FHIR R4B resources of trial NCT06776510 and their ITP response."""
