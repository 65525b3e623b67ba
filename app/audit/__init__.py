"""The audit trail: every change, read, search, refusal and login failure as an AuditEvent."""
