"""The FHIR wire: routes, content negotiation, search parameters, Bundles, OperationOutcome."""
