"""Use cases: validate -> normalise -> store (-> recompute), one transaction per request."""
