"""What a search returns: sorting, paging, totals, summaries, elements, included resources,
warnings, and the same search as a POST (both databases)."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import httpx
import jsonschema
import pytest
from sqlalchemy import text

from app.fhir.search_routes import FORM, form_body
from app.main import create_app
from app.services.response import response_observation_id
from app.settings import Settings
from tests import builders
from tests.conftest import KEY, bearer
from tests.test_crud import create

SUBSETTED = "SUBSETTED"


def _matches(bundle: dict) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def _included(bundle: dict) -> list[tuple[str, str]]:
    return [
        (e["resource"]["resourceType"], e["resource"]["id"])
        for e in bundle.get("entry", [])
        if e["search"]["mode"] == "include"
    ]


def _outcomes(bundle: dict) -> list[dict]:
    return [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "outcome"]


def _next(bundle: dict) -> str | None:
    for link in bundle["link"]:
        if link["relation"] == "next":
            parts = urlsplit(link["url"])
            return f"{parts.path}?{parts.query}"
    return None


async def _all_pages(client: httpx.AsyncClient, url: str) -> tuple[list[str], list[dict]]:
    ids, bundles = [], []
    next_url: str | None = url
    while next_url is not None:
        response = await client.get(next_url)
        assert response.status_code == 200, response.text
        bundle = response.json()
        bundles.append(bundle)
        ids += _matches(bundle)
        next_url = _next(bundle)
    return ids, bundles


async def _new(client: httpx.AsyncClient, resource: dict) -> str:
    return (await create(client, resource)).json()["id"]


@pytest.fixture
async def counts(client) -> tuple[str, dict[str, str]]:
    """One patient's counts: two on 10 March, two on 3 March, one on 17 March."""
    patient = await _new(client, builders.patient("S01-001"))
    ids = {}
    for label, day in (("a", 10), ("b", 3), ("c", 10), ("d", 17), ("e", 3)):
        body = builders.platelet_count(patient, f"2025-03-{day:02d}T09:00:00Z", 20 + day)
        ids[label] = await _new(client, body)
    return patient, ids


@pytest.mark.parametrize("page_size", [1, 2, 100])
async def test_sort_on_several_keys_in_both_directions_pages_in_order(client, counts, page_size):
    patient, ids = counts
    by_day = {"b": 3, "e": 3, "a": 10, "c": 10, "d": 17}
    base = f"/fhir/Observation?patient={patient}&code=777-3&_count={page_size}"

    newest_first = sorted(ids, key=lambda k: (-by_day[k], ids[k]))
    seen, _ = await _all_pages(client, f"{base}&_sort=-date,_id")
    assert seen == [ids[k] for k in newest_first]

    oldest_first_ids_descending = sorted(ids, key=lambda k: (by_day[k], _reverse(ids[k])))
    seen, _ = await _all_pages(client, f"{base}&_sort=date,-_id")
    assert seen == [ids[k] for k in oldest_first_ids_descending]

    created_order = [ids[k] for k in "abcde"]
    assert (await _all_pages(client, f"{base}&_sort=_lastUpdated"))[0] == created_order
    assert (await _all_pages(client, f"{base}&_sort=-_lastUpdated"))[0] == created_order[::-1]
    assert (await _all_pages(client, f"{base}&_sort=-_id"))[0] == sorted(ids.values())[::-1]


def _reverse(text_value: str) -> list[int]:
    return [-ord(char) for char in text_value]


async def test_patients_sort_by_birth_date(client):
    born = {"1990": "S01-001", "1955-07-01": "S01-002", "1971-02-14": "S01-003"}
    ids = {}
    for date, subject in born.items():
        ids[date] = await _new(client, builders.patient(subject, birthDate=date))
    bundle = (await client.get("/fhir/Patient?_sort=-birthdate")).json()
    assert _matches(bundle) == [ids["1990"], ids["1971-02-14"], ids["1955-07-01"]]


async def test_total_is_counted_on_request_on_every_page(client, counts):
    patient, ids = counts
    base = f"/fhir/Observation?patient={patient}&code=777-3&_count=2"
    _, pages = await _all_pages(client, f"{base}&_total=accurate")
    assert len(pages) == 3
    assert [page["total"] for page in pages] == [5, 5, 5]
    _, pages = await _all_pages(client, f"{base}&_total=none")
    assert all("total" not in page for page in pages)
    assert "total" not in (await client.get(base)).json()


async def test_summary_count_answers_the_total_only(client, counts):
    patient, _ = counts
    bundle = (
        await client.get(f"/fhir/Observation?patient={patient}&code=777-3&_summary=count")
    ).json()
    assert bundle["total"] == 5
    assert "entry" not in bundle
    assert _next(bundle) is None
    other = await _new(client, builders.patient("S01-009"))
    empty = (await client.get(f"/fhir/Observation?patient={other}&_summary=count")).json()
    assert empty["total"] == 1  # the response status of the new patient


async def test_count_zero_answers_the_total_only(client, counts):
    """`_count=0` is how fhirpy's count() and others ask for the number of matches alone."""
    patient, _ = counts
    for query in ("_count=0", "_count=0&_total=none", "_summary=count&_total=none"):
        bundle = (
            await client.get(f"/fhir/Observation?patient={patient}&code=777-3&{query}")
        ).json()
        assert bundle["total"] == 5, query
        assert "entry" not in bundle and _next(bundle) is None, query
    # The same in a Bundle's search entry.
    entry = {"request": {"method": "GET", "url": f"Observation?patient={patient}&_count=0"}}
    answer = await client.post(
        "/fhir", json={"resourceType": "Bundle", "type": "batch", "entry": [entry]}
    )
    assert answer.json()["entry"][0]["resource"]["total"] == 6  # and the response status


@pytest.mark.parametrize("name", ["_count", "_summary", "_total", "_elements", "_sort"])
async def test_a_repeated_result_parameter_is_400(client, counts, name):
    """Which of two values counts cannot be told: the last one used to win silently."""
    patient, _ = counts
    value = {
        "_count": ("5", "7"),
        "_summary": ("count", "count"),
        "_total": ("accurate", "none"),
        "_elements": ("status", "value"),
        "_sort": ("date", "-date"),
    }[name]
    query = f"patient={patient}&{name}={value[0]}&{name}={value[1]}"
    response = await client.get(f"/fhir/Observation?{query}")
    assert response.status_code == 400, response.text
    issue = response.json()["issue"][0]
    assert issue["expression"] == [name] and "more than once" in issue["diagnostics"]
    # Once in the URL and once in a form body is twice too.
    response = await client.post(
        f"/fhir/Observation/_search?{name}={value[0]}",
        content=f"patient={patient}&{name}={value[1]}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 400, response.text
    once = await client.get(f"/fhir/Observation?patient={patient}&{name}={value[0]}")
    assert once.status_code == 200


async def test_elements_keep_the_asked_and_the_mandatory_and_mark_subsetted(client, counts):
    patient, ids = counts
    bundle = (await client.get(f"/fhir/Observation?_id={ids['a']}&_elements=value")).json()
    [observation] = [e["resource"] for e in bundle["entry"]]
    # code and status are mandatory in an Observation, subject in the trial profile: kept
    # although not asked for.
    assert set(observation) == {
        "resourceType",
        "id",
        "meta",
        "status",
        "code",
        "subject",
        "valueQuantity",
    }
    assert any(tag["code"] == SUBSETTED for tag in observation["meta"]["tag"])
    full = (await client.get(f"/fhir/Observation/{ids['a']}")).json()
    assert observation["valueQuantity"] == full["valueQuantity"]
    assert "tag" not in full["meta"]  # the stored resource is unchanged


async def test_summary_modes_subset_the_resource(client, counts):
    patient, ids = counts
    full = (await client.get(f"/fhir/Observation/{ids['a']}")).json()

    async def one(summary: str) -> dict:
        bundle = (await client.get(f"/fhir/Observation?_id={ids['a']}&_summary={summary}")).json()
        return bundle["entry"][0]["resource"]

    summary = await one("true")
    assert "category" in full and "category" not in summary  # category is not a summary element
    assert {"status", "code", "subject", "effectiveDateTime", "valueQuantity"} <= set(summary)
    assert any(tag["code"] == SUBSETTED for tag in summary["meta"]["tag"])
    # status and code are mandatory in R4B, subject in the trial profile.
    assert set(await one("text")) == {"resourceType", "id", "meta", "status", "code", "subject"}
    data = await one("data")
    assert {k: v for k, v in data.items() if k != "meta"} == {
        k: v for k, v in full.items() if k != "meta"
    }
    assert await one("false") == full
    # _elements says which elements: a _summary beside it is ignored, with a warning.
    both = (
        await client.get(f"/fhir/Observation?_id={ids['a']}&_summary=true&_elements=category")
    ).json()
    assert "category" in both["entry"][0]["resource"]
    assert _outcomes(both)[0]["issue"][0]["severity"] == "warning"


async def test_include_the_subjects_once_each(client, counts):
    patient, ids = counts
    other = await _new(client, builders.patient("S01-002"))
    other_count = await _new(client, builders.platelet_count(other, "2025-03-04T09:00:00Z", 50))
    bundle = (
        await client.get(
            "/fhir/Observation?code=777-3&_include=Observation:subject&_include=Observation:patient"
        )
    ).json()
    assert set(_matches(bundle)) == set(ids.values()) | {other_count}
    assert sorted(_included(bundle)) == sorted([("Patient", patient), ("Patient", other)])
    included = [e for e in bundle["entry"] if e["search"]["mode"] == "include"]
    assert included[0]["fullUrl"].endswith(f"/fhir/Patient/{included[0]['resource']['id']}")
    for resource_type in ("MedicationAdministration", "AdverseEvent"):
        body = (
            builders.administration(patient, "2025-03-03T08:00:00Z")
            if resource_type == "MedicationAdministration"
            else builders.adverse_event(patient, "2025-03-05")
        )
        record = await _new(client, body)
        found = (
            await client.get(f"/fhir/{resource_type}?_id={record}&_include={resource_type}:subject")
        ).json()
        assert _included(found) == [("Patient", patient)]
    # Included resources come with the page they belong to, not with every page.
    first = (
        await client.get(
            f"/fhir/Observation?patient={other}&_include=Observation:subject&_count=1&_sort=date"
        )
    ).json()
    assert _included(first) == [("Patient", other)]


async def test_revinclude_the_records_of_the_patients(client, counts):
    patient, ids = counts
    dose = await _new(client, builders.administration(patient, "2025-03-03T08:00:00Z"))
    event = await _new(client, builders.adverse_event(patient, "2025-03-05"))
    await _new(client, builders.patient("S01-002"))  # a patient with no records but a status
    query = (
        "/fhir/Patient?identifier=S01-001&_revinclude=Observation:subject"
        "&_revinclude=MedicationAdministration:patient&_revinclude=AdverseEvent:subject"
    )
    bundle = (await client.get(query)).json()
    assert _matches(bundle) == [patient]
    expected = {("Observation", i) for i in ids.values()}
    expected |= {("Observation", response_observation_id(patient))}
    expected |= {("MedicationAdministration", dose), ("AdverseEvent", event)}
    assert sorted(_included(bundle)) == sorted(expected)


async def test_included_resources_never_cross_sites(client, anonymous, app):
    s01 = await _new(client, builders.patient("S01-001"))
    s02 = await _new(client, builders.patient("S02-001", site="S02"))
    s01_count = await _new(client, builders.platelet_count(s01, "2025-03-10T09:00:00Z", 20))
    s02_count = await _new(client, builders.platelet_count(s02, "2025-03-10T09:00:00Z", 30))
    investigator = bearer("investigator", ("S01",))
    bundle = (
        await anonymous.get(
            "/fhir/Observation?code=777-3&_include=Observation:subject", headers=investigator
        )
    ).json()
    assert _matches(bundle) == [s01_count]
    assert _included(bundle) == [("Patient", s01)]
    # Data is never perfect: a record whose site disagrees with its patient's must not
    # bring that patient along.
    async with app.state.services.db.write() as conn:
        await conn.execute(
            text("UPDATE resource SET site = 'S01' WHERE id = :id"), {"id": s02_count}
        )
    bundle = (
        await anonymous.get(
            "/fhir/Observation?code=777-3&_include=Observation:subject", headers=investigator
        )
    ).json()
    assert set(_matches(bundle)) == {s01_count, s02_count}
    assert _included(bundle) == [("Patient", s01)]
    revincluded = (
        await anonymous.get(
            "/fhir/Patient?_revinclude=Observation:subject", headers=bearer("monitor", ("S02",))
        )
    ).json()
    assert _matches(revincluded) == [s02]
    assert _included(revincluded) == [("Observation", response_observation_id(s02))]


async def test_a_lab_looks_patients_up_by_identifier_only(client, anonymous):
    patient = await _new(client, builders.patient("S01-001"))
    count = await _new(client, builders.platelet_count(patient, "2025-03-10T09:00:00Z", 20))
    lab = bearer("lab", ("S01",))

    async def status(query: str) -> int:
        return (await anonymous.get(f"/fhir/{query}", headers=lab)).status_code

    assert await status("Patient?identifier=S01-001") == 200
    assert await status("Patient?identifier=S01-001&_revinclude=Observation:subject") == 200
    found = (
        await anonymous.get(
            "/fhir/Patient?identifier=S01-001&_revinclude=Observation:subject", headers=lab
        )
    ).json()
    assert ("Observation", count) in _included(found)
    # Anything that would list patients without naming one: refused.
    for query in (
        "Patient",
        "Patient?identifier=",
        "Patient?identifier:not=S01-002",
        "Patient?identifier:missing=false",
        f"Patient?identifier={builders.SUBJECT_SYSTEM}|",
        "Patient?name=a",
        "Observation?_include=Observation:subject",
        "Observation?subject:Patient.name=a",
        "Patient?identifier=S01-001&_revinclude=MedicationAdministration:subject",
    ):
        assert await status(query) == 403, query
    assert await status("Observation?subject:Patient.identifier=S01-001") == 200


async def test_includes_need_the_right_to_read_them(client, anonymous):
    patient = await _new(client, builders.patient("S01-001"))
    await _new(client, builders.adverse_event(patient, "2025-03-05"))
    no_patients = bearer("investigator", ("S01",), scope="user/AdverseEvent.rs")
    response = await anonymous.get(
        "/fhir/AdverseEvent?_include=AdverseEvent:subject", headers=no_patients
    )
    assert response.status_code == 403
    assert (await anonymous.get("/fhir/AdverseEvent", headers=no_patients)).status_code == 200


@pytest.mark.parametrize(
    "query",
    [
        "Observation?nickname=x",
        "Observation?code:text=platelets",
        "Observation?date:exact=2025",
        "Observation?_include:iterate=Observation:subject",
        "Observation?_revinclude=Observation:subject",
        "Observation?subject:Group.identifier=x",
        "Observation?subject.organization.name=x",
        "Observation?code.identifier=x",
        "Observation?_has:Observation:subject:code=x",
    ],
)
async def test_what_is_not_supported_warns_or_fails_when_strict(client, query):
    lenient = await client.get(f"/fhir/{query}")
    assert lenient.status_code == 200, lenient.text
    [outcome] = _outcomes(lenient.json())
    assert outcome["issue"][0]["severity"] == "warning"
    assert outcome["issue"][0]["code"] == "not-supported"
    strict = await client.get(f"/fhir/{query}", headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400, strict.text
    assert strict.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    "query",
    [
        "_sort=value-quantity",
        "_sort=date,",
        "_total=some",
        "_summary=maybe",
        "_elements=code.coding",
        "_count=-1",
        # The include paths are documented as a closed list; another path is no search.
        "_include=Observation:performer",
        "_include=Patient:organization",
        "_include=AAA",
        # Their schema (integer, enumeration) admits no empty value: an empty one is malformed.
        "_count=",
        "_total=",
        "_summary=",
        "_include=",
    ],
)
async def test_bad_result_parameters_are_400(client, query):
    response = await client.get(f"/fhir/Observation?{query}")
    assert response.status_code == 400, query
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_empty_search_parameters_and_free_form_controls_are_ignored(client):
    """FHIR ignores a search parameter without a value; so are the controls whose schema
    admits the empty string (_sort, _elements)."""
    for query in ("code=", "patient=&date=", "_sort=", "_elements=", "_id=&_count=5"):
        response = await client.get(f"/fhir/Observation?{query}")
        assert response.status_code == 200, (query, response.text)
        assert not _outcomes(response.json()), query


async def test_post_search_with_a_form_body(app, client, counts):
    patient, ids = counts
    form = {"patient": patient, "date": "ge2025-03-10", "_sort": "-date,_id", "_count": "2"}
    response = await client.post("/fhir/Observation/_search?code=777-3", data=form)
    assert response.status_code == 200, response.text
    bundle = response.json()
    expected = (await client.get(f"/fhir/Observation?code=777-3&{_form(form)}&_count=10")).json()
    assert _matches(bundle) == _matches(expected)[:2]
    assert len(_matches(expected)) == 3
    self_link = next(link["url"] for link in bundle["link"] if link["relation"] == "self")
    assert dict(parse_qsl(urlsplit(self_link).query)) == {"code": "777-3", **form}
    # The next page is a GET; it continues where the POST stopped.
    rest, _ = await _all_pages(client, _next(bundle))
    assert _matches(bundle) + rest == _matches(expected)
    # Criteria in the URL and in the body apply together.
    narrowed = await client.post(
        f"/fhir/Observation/_search?_id={ids['d']}", data={"patient": patient}
    )
    assert _matches(narrowed.json()) == [ids["d"]]
    # Repeated fields and controls work as in a URL.
    repeated = await client.post(
        "/fhir/Observation/_search",
        content=f"patient={patient}&date=gt2025-03-04&date=lt2025-03-16&_total=accurate",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert sorted(_matches(repeated.json())) == sorted([ids["a"], ids["c"]])
    assert repeated.json()["total"] == 2
    await app.state.services.audit.flush()
    async with app.state.services.db.read() as conn:
        audited = (
            await conn.execute(
                text("SELECT content FROM audit_event WHERE content LIKE :q"),
                {"q": f"%patient={patient}&date=gt2025-03-04%"},
            )
        ).all()
    assert len(audited) == 1  # the POSTed criteria are in the search's audit record


async def test_post_search_refuses_other_bodies(client):
    response = await client.post("/fhir/Patient/_search", json={"identifier": "S01-001"})
    assert response.status_code == 415
    assert response.json()["resourceType"] == "OperationOutcome"
    bad = await client.post(
        "/fhir/Patient/_search",
        content=b"name=%FF%FE",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert bad.status_code == 400
    empty = await client.post("/fhir/Patient/_search")
    assert empty.status_code == 200
    lab = await client.post(
        "/fhir/Patient/_search", data={"name": "a"}, headers=bearer("lab", ("S01",))
    )
    assert lab.status_code == 403


@pytest.mark.parametrize(
    ("fields", "body", "accepted"),
    [
        # A form carries text: a number, a list (repeated fields), a nested list, a mapping
        # (its keys) are all fields the server takes, and the schema admits them.
        ({"nickname": 1.5}, "nickname=1.5", True),
        ({"nickname": ["a", ["b"]]}, "nickname=a&nickname=b", True),
        ({"nickname": {"a": 1}}, "nickname=a", True),
        ({"nick\x00name": []}, "", True),  # [] or {}: no field is sent
        ({"nick\x00name": None}, "nick%00name=null", False),
        # A NUL anywhere on the wire is refused, and the schema says so: in a name, a value,
        # an item of a repeated field, a key of a mapping.
        ({"nick\x00name": "a"}, "nick%00name=a", False),
        ({"nickname": "a\x00"}, "nickname=a%00", False),
        ({"nickname": ["a", ["b\x00"]]}, "nickname=a&nickname=b%00", False),
        ({"nickname": {"a\x00": 1}}, "nickname=a%00", False),
    ],
)
async def test_post_search_form_schema_is_what_the_server_takes(client, fields, body, accepted):
    schema = form_body("Patient")["requestBody"]["content"][FORM]["schema"]
    assert jsonschema.Draft202012Validator(schema).is_valid(fields) is accepted
    response = await client.post(
        "/fhir/Patient/_search", content=body, headers={"Content-Type": FORM}
    )
    assert response.status_code == (200 if accepted else 400), response.text


def _form(form: dict[str, str]) -> str:
    return "&".join(f"{k}={v}" for k, v in form.items() if k != "_count")


async def test_included_resources_are_capped_with_a_warning(database_url):
    settings = Settings(database_url=database_url, environment="test", max_page_size=3)
    application = create_app(settings, key_source=KEY)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=bearer("admin")
        ) as http:
            patient = await _new(http, builders.patient("S01-001"))
            for day in range(1, 6):
                when = f"2025-03-{day:02d}T09:00:00Z"
                await _new(http, builders.platelet_count(patient, when, 20))
            bundle = (
                await http.get("/fhir/Patient?_id=" + patient + "&_revinclude=Observation:subject")
            ).json()
    assert _matches(bundle) == [patient]
    assert len(_included(bundle)) == 3  # of the patient's five counts and response status
    [outcome] = _outcomes(bundle)
    assert outcome["issue"][0]["code"] == "too-costly"
    assert outcome["issue"][0]["severity"] == "warning"


async def test_a_subsetted_patient_keeps_its_site(client, counts):
    """The trial profile makes the site mandatory (fhir-profile.md), and the documented
    Patient schema requires it: a subsetted Patient keeps it, as R4B's mandatory elements."""
    patient, _ = counts
    full = (await client.get(f"/fhir/Patient/{patient}")).json()
    for query in ("_summary=text", "_elements=gender", "_summary=true", "_summary=data"):
        bundle = (await client.get(f"/fhir/Patient?_id={patient}&{query}")).json()
        [subsetted] = [e["resource"] for e in bundle["entry"]]
        assert subsetted["managingOrganization"] == full["managingOrganization"], query
        assert any(tag["code"] == SUBSETTED for tag in subsetted["meta"]["tag"]), query
