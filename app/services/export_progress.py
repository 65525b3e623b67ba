"""What a Bulk Data status request says of a job: how far it got, or that it failed."""

from __future__ import annotations

from app.kit.errors import ExportFailed
from app.store import exports as store


def progress(job: store.Job) -> str | None:
    """How far a queued or running job got; None once it is complete. A failed job is an
    `ExportFailed` (the IG answers a failed export with an error, not a manifest)."""
    if job.status == store.FAILED:
        raise ExportFailed(job.error or "the export failed")
    if job.status == store.COMPLETED:
        return None
    return job.progress or ("queued" if job.status == store.QUEUED else "in progress")
