"""GET /metrics: Prometheus text, no token needed, route templates as labels, never ids."""

from __future__ import annotations

from tests import builders
from tests.test_crud import create


async def test_metrics_count_requests_by_route_template(client, anonymous) -> None:
    patient_id = (await create(client, builders.patient())).json()["id"]
    await create(client, builders.administration(patient_id, "2025-03-03T08:00:00Z"))
    count = await create(client, builders.platelet_count(patient_id, "2025-03-10T09:00:00Z", 42))
    observation_id = count.json()["id"]
    assert (await client.get(f"/fhir/Observation/{observation_id}")).status_code == 200
    assert (await client.get("/fhir/Observation/does-not-exist")).status_code == 404
    await client.get("/no/such/route")

    answer = await anonymous.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    read = 'route="/fhir/Observation/{resource_id}"'
    assert any(
        line.startswith("itp_http_requests_total{") and read in line and 'status="404"' in line
        for line in text.splitlines()
    )
    assert any(
        line.startswith("itp_http_requests_total{") and 'route="<unmatched>"' in line
        for line in text.splitlines()
    )
    assert "itp_http_request_duration_seconds_bucket{" in text
    # Every write recomputed the patient's response, and was timed.
    recomputes = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("itp_recompute_seconds_count")
    ]
    assert recomputes and recomputes[0] >= 2
    assert "itp_db_pool_connections{" in text
    # No raw path, id or query string ever becomes a label.
    assert patient_id not in text and observation_id not in text
    assert "does-not-exist" not in text and "/no/such/route" not in text
