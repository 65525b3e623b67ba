"""HL7 v2 lab results, pure: ORU^R01 read and ACKs written (`hl7v2`), each OBX mapped onto
the trial's platelet-count Observation (`observations`). No database, no HTTP: the route is
`app/ingest/routes.py`, the use case `app/services/hl7_ingest.py`."""
