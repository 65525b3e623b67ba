"""Every declared search parameter and modifier, through HTTP, on both databases."""

from __future__ import annotations

import httpx
import pytest

from app.services.response import response_observation_id
from tests import builders
from tests.conftest import bearer
from tests.test_crud import create

LOINC = "http://loinc.org"
SERIOUSNESS = "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness"


async def found(client: httpx.AsyncClient, query: str, **headers: str) -> set[str]:
    """The ids of the matches (every page: `_count=1000`)."""
    separator = "&" if "?" in query else "?"
    response = await client.get(f"/fhir/{query}{separator}_count=1000", headers=headers)
    assert response.status_code == 200, (query, response.text)
    entries = response.json().get("entry", [])
    return {e["resource"]["id"] for e in entries if e["search"]["mode"] == "match"}


async def _id(client: httpx.AsyncClient, resource: dict) -> str:
    return (await create(client, resource)).json()["id"]


@pytest.fixture
async def patients(client) -> dict[str, str]:
    """Three patients at S01 and one at S02."""
    return {
        "anna": await _id(
            client,
            builders.patient(
                "S01-001",
                name=[{"family": "Müller", "given": ["Anna"], "prefix": ["Dr"]}],
                birthDate="1968-04-12",
            ),
        ),
        "ben": await _id(
            client,
            builders.patient(
                "S01-002",
                name=[{"family": "Mueller-Smith", "given": ["Ben"]}],
                gender="male",
                birthDate="1975-11-30",
            ),
        ),
        "carla": await _id(
            client,
            builders.patient(
                "S01-003",
                name=[{"family": "Smith", "given": ["Carla", "Maria"], "text": "Carla M. Smith"}],
                birthDate="1990",
            ),
        ),
        "dora": await _id(
            client,
            builders.patient(
                "S02-001", site="S02", name=[{"family": "Dorn"}], birthDate="1950-01-01"
            ),
        ),
    }


async def test_patient_names_ignore_case_and_accents_and_match_the_start(client, patients):
    anna, ben, carla = patients["anna"], patients["ben"], patients["carla"]
    assert await found(client, "Patient?name=mull") == {anna}
    assert await found(client, "Patient?name=MÜLLER") == {anna}
    assert await found(client, "Patient?name=dr") == {anna}  # a prefix is part of the name
    assert await found(client, "Patient?name=carla m.") == {carla}  # the text
    assert await found(client, "Patient?family=smith") == {carla}
    assert await found(client, "Patient?family:contains=SMITH") == {ben, carla}
    assert await found(client, "Patient?family:exact=Müller") == {anna}
    assert await found(client, "Patient?family:exact=müller") == set()
    assert await found(client, "Patient?family:exact=Müll") == set()
    assert await found(client, "Patient?given=maria") == {carla}
    assert await found(client, "Patient?given=mar") == {carla}
    assert await found(client, "Patient?given:contains=arl") == {carla}
    # A wildcard of SQL is an ordinary character here.
    assert await found(client, "Patient?name=%25") == set()
    assert await found(client, "Patient?family:contains=_") == set()


async def test_patient_birthdate_gender_identifier_id_and_site(client, patients):
    anna, ben, carla, dora = (patients[k] for k in ("anna", "ben", "carla", "dora"))
    site = builders.SITE_SYSTEM
    assert await found(client, "Patient?birthdate=1968") == {anna}
    assert await found(client, "Patient?birthdate=1968-04-12") == {anna}
    assert await found(client, "Patient?birthdate=lt1970") == {anna, dora}
    assert await found(client, "Patient?birthdate=ge1975-11-30") == {ben, carla}
    assert await found(client, "Patient?birthdate=1990-06") == set()  # 1990 is wider
    assert await found(client, "Patient?birthdate=gt1969&birthdate=lt1980") == {ben}
    assert await found(client, "Patient?gender=male") == {ben}
    assert await found(client, "Patient?gender=http://hl7.org/fhir/administrative-gender|male") == {
        ben
    }
    assert await found(client, "Patient?gender:not=female") == {ben}
    assert await found(client, "Patient?identifier=S01-001,S01-003") == {anna, carla}
    assert await found(client, f"Patient?_id={anna},{ben}") == {anna, ben}
    assert await found(client, f"Patient?_id={anna},{ben}&_id={ben},{carla}") == {ben}
    assert await found(client, "Patient?organization=S02") == {dora}
    assert await found(client, "Patient?organization=Organization/S01") == {anna, ben, carla}
    assert await found(client, f"Patient?organization:identifier={site}|S02") == {dora}
    assert await found(client, "Patient?organization:identifier=urn:other|S02") == set()
    # Several values OR-ed, several parameters AND-ed.
    assert await found(client, "Patient?name=m&gender=male") == {ben}
    assert await found(client, "Patient?name=dorn,smith") == {carla, dora}


async def test_a_site_user_sees_only_its_site_whatever_organization_asks(anonymous, patients):
    s01 = bearer("investigator", ("S01",))
    assert await found(anonymous, "Patient?organization=S02", **s01) == set()
    assert await found(anonymous, "Patient?name=d", **s01) == {patients["anna"]}
    assert await found(anonymous, "Patient?name=d", **bearer("admin")) == {
        patients["anna"],
        patients["dora"],
    }


async def test_last_updated(client, patients):
    first = (await client.get(f"/fhir/Patient/{patients['anna']}")).json()["meta"]["lastUpdated"]
    later = (await client.get(f"/fhir/Patient/{patients['ben']}")).json()["meta"]["lastUpdated"]
    rest = {patients["ben"], patients["carla"], patients["dora"]}
    assert await found(client, f"Patient?_lastUpdated=ge{later}") == rest
    assert await found(client, f"Patient?_lastUpdated=lt{later}") == {patients["anna"]}
    assert await found(client, f"Patient?_lastUpdated={first}") == {patients["anna"]}
    assert await found(client, f"Patient?_lastUpdated=le{later[:4]}") == set(patients.values())


@pytest.fixture
async def observations(client, patients) -> dict[str, str]:
    anna = patients["anna"]
    kilo = builders.platelet_count(anna, "2025-03-12T09:00:00Z", 150)
    kilo["valueQuantity"] = {"value": 150, "unit": "K/uL"}  # a lab's spelling, no UCUM code
    hemoglobin = {
        **builders.platelet_count(anna, "2025-03-12T09:00:00Z", 12, unit="g/dL"),
        "code": {"coding": [{"system": LOINC, "code": "718-7"}]},
    }
    del hemoglobin["category"]
    return {
        "low": await _id(
            client, builders.platelet_count(anna, "2025-03-03T09:00:00Z", 25000, unit="/uL")
        ),
        "mid": await _id(
            client,
            builders.platelet_count(
                anna,
                "2025-03-10T09:00:00Z",
                42,
                status="preliminary",
                identifier=[{"system": "urn:lab", "value": "ORD-1,2"}],
            ),
        ),
        "high": await _id(client, kilo),
        "hemoglobin": await _id(client, hemoglobin),
        "grade": await _id(client, builders.bleeding_grade(anna, "2025-03-10T09:00:00Z", 1)),
        "status": response_observation_id(anna),
        "other": await _id(
            client, builders.platelet_count(patients["ben"], "2025-03-10T09:00:00Z", 20)
        ),
    }


async def test_value_quantity_compares_counts_in_one_unit(client, patients, observations):
    low, mid, high, hb = (observations[k] for k in ("low", "mid", "high", "hemoglobin"))
    ucum = "http://unitsofmeasure.org"
    query = "Observation?value-quantity="
    assert await found(client, f"{query}lt30|{ucum}|10*9/L") == {low, observations["other"]}
    assert await found(client, f"{query}gt40000||/uL") == {mid, high}
    assert await found(client, f"{query}25|{ucum}|10*9/L") == {low}  # 25000 /uL is 25
    assert await found(client, f"{query}25.0|{ucum}|10*9/L") == {low}
    assert await found(client, f"{query}ge100||K/uL") == {high}
    assert await found(client, f"{query}ap40|{ucum}|10*3/uL") == {mid}  # 36 to 44
    assert await found(client, f"{query}ne25|{ucum}|10*9/L&patient={patients['anna']}") == {
        mid,
        high,
    }
    # A unit that is not a count per volume is compared as sent.
    assert await found(client, f"{query}12|{ucum}|g/dL") == {hb}
    assert await found(client, f"{query}12||g/dL") == {hb}
    assert await found(client, f"{query}12|urn:other|g/dL") == set()
    assert await found(client, f"{query}lt30") == {hb, observations["other"]}  # any unit
    assert await found(client, f"{query}lt30|{ucum}|10*9/L,ge100|{ucum}|10*9/L") == {
        low,
        high,
        observations["other"],
    }


async def test_observation_tokens_modifiers_and_subject_forms(client, patients, observations):
    anna = patients["anna"]
    counts = {observations[k] for k in ("low", "mid", "high")}
    everything = counts | {observations[k] for k in ("hemoglobin", "grade", "status")}
    assert await found(client, f"Observation?patient={anna}") == everything
    assert await found(client, f"Observation?subject=Patient/{anna}") == everything
    assert await found(client, f"Observation?subject:Patient={anna}") == everything
    url = f"https://elsewhere.example/fhir/Patient/{anna}"
    assert await found(client, f"Observation?subject={url}") == everything
    mine = f"patient={anna}"
    assert await found(client, f"Observation?{mine}&code=777-3") == counts
    assert await found(client, f"Observation?{mine}&code={LOINC}|777-3") == counts
    assert await found(client, f"Observation?{mine}&code={LOINC}|") == counts | {
        observations["hemoglobin"]
    }
    assert await found(client, f"Observation?{mine}&code=|777-3") == set()  # a system is set
    assert await found(client, f"Observation?{mine}&code:not=777-3") == {
        observations["hemoglobin"],
        observations["grade"],
        observations["status"],
    }
    assert await found(client, f"Observation?{mine}&category=laboratory") == counts
    assert await found(client, f"Observation?{mine}&category:missing=true") == {
        observations["hemoglobin"],
        observations["grade"],
        observations["status"],
    }
    assert await found(client, f"Observation?{mine}&status=preliminary") == {observations["mid"]}
    assert await found(client, f"Observation?{mine}&code=777-3&status:not=final") == {
        observations["mid"]
    }
    # An escaped comma is part of the value, not a second value.
    assert await found(client, "Observation?identifier=urn:lab|ORD-1\\,2") == {observations["mid"]}
    assert await found(client, "Observation?identifier=urn:lab|ORD-1") == set()
    assert await found(client, f"Observation?{mine}&identifier:missing=false") == {
        observations["mid"]
    }
    assert await found(client, f"Observation?{mine}&value-quantity:missing=true") == {
        observations["grade"],
        observations["status"],
    }
    assert await found(client, f"Observation?{mine}&date:missing=true") == set()


async def test_medication_administration_parameters(client, patients):
    anna = patients["anna"]
    study = await _id(client, builders.administration(anna, "2025-03-03T08:00:00Z"))
    rescue_body = builders.administration(
        anna, "2025-03-12T08:00:00Z", role="rescue", status="in-progress"
    )
    rescue_body["medicationCodeableConcept"] = {
        "coding": [{"system": "http://snomed.info/sct", "code": "1290004", "display": "IVIg"}]
    }
    rescue_body["identifier"] = [{"system": "urn:pharmacy", "value": "RX-9"}]
    rescue = await _id(client, rescue_body)
    unroled_body = builders.administration(anna, "2025-03-20T08:00:00Z", drug="Tranexamic acid")
    del unroled_body["category"]
    unroled = await _id(client, unroled_body)
    other = await _id(client, builders.administration(patients["ben"], "2025-03-03T08:00:00Z"))
    mine = f"MedicationAdministration?patient={anna}"
    role = builders.ROLE_SYSTEM
    assert await found(client, f"{mine}&medication-role=rescue") == {rescue}
    # The profile: an administration without a role is concomitant.
    assert await found(client, f"{mine}&medication-role=concomitant") == {unroled}
    assert await found(client, f"{mine}&medication-role={role}|study-drug") == {study}
    assert await found(client, f"{mine}&medication-role:not=study-drug") == {rescue, unroled}
    assert await found(client, f"{mine}&category={role}|rescue") == {rescue}
    assert await found(client, f"{mine}&category:missing=true") == {unroled}
    assert await found(client, f"{mine}&code=http://snomed.info/sct|1290004") == {rescue}
    assert await found(client, f"{mine}&status=in-progress") == {rescue}
    assert await found(client, f"{mine}&status=completed") == {study, unroled}
    assert await found(client, f"{mine}&effective-time=2025-03-03") == {study}
    assert await found(client, f"{mine}&effective-time=gt2025-03-10") == {rescue, unroled}
    assert await found(client, "MedicationAdministration?identifier=urn:pharmacy|RX-9") == {rescue}
    assert await found(client, "MedicationAdministration?effective-time=2025-03-03") == {
        study,
        other,
    }
    assert await found(client, f"MedicationAdministration?subject=Patient/{anna}") == {
        study,
        rescue,
        unroled,
    }


async def test_adverse_event_parameters(client, patients):
    anna = patients["anna"]
    headache = await _id(client, builders.adverse_event(anna, "2025-03-05", grade=2))
    bleeding_body = builders.adverse_event(anna, "2025-03-10", bleeding=True, grade=4)
    bleeding_body["seriousness"] = {"coding": [{"system": SERIOUSNESS, "code": "serious"}]}
    bleeding = await _id(client, bleeding_body)
    ungraded_body = builders.adverse_event(anna, "2025-03-20T10:00:00+01:00")
    del ungraded_body["extension"]
    ungraded = await _id(client, ungraded_body)
    mine = f"AdverseEvent?subject={anna}"
    assert await found(client, f"{mine}&grade=ge3") == {bleeding}
    assert await found(client, f"{mine}&grade=2") == {headache}
    assert await found(client, f"{mine}&grade=2,4") == {headache, bleeding}
    assert await found(client, f"{mine}&grade=lt4&grade=gt1") == {headache}
    assert await found(client, f"{mine}&grade:missing=true") == {ungraded}
    assert await found(client, f"{mine}&seriousness=serious") == {bleeding}
    assert await found(client, f"{mine}&seriousness={SERIOUSNESS}|non-serious") == {
        headache,
        ungraded,
    }
    assert await found(client, f"{mine}&event=http://snomed.info/sct|131148009") == {bleeding}
    assert await found(client, f"{mine}&event:missing=true") == {headache, ungraded}
    assert await found(client, f"{mine}&date=2025-03-10") == {bleeding}
    assert await found(client, f"{mine}&date=lt2025-03-10") == {headache}
    assert await found(client, f"{mine}&date=2025-03-20T09:00:00Z") == {ungraded}
    assert await found(client, f"AdverseEvent?subject:Patient={patients['ben']}") == set()


async def test_chained_search_through_the_subject(client, patients, observations):
    ben = patients["ben"]
    anna_records = {observations[k] for k in ("low", "mid", "high", "hemoglobin", "grade")}
    anna_records.add(observations["status"])
    ben_records = {observations["other"], response_observation_id(ben)}
    subject = builders.SUBJECT_SYSTEM
    query = "Observation?subject:Patient.identifier"
    assert await found(client, f"{query}={subject}|S01-001") == anna_records
    assert await found(client, f"{query}=S01-002") == ben_records
    assert await found(client, f"{query}=S01-001,S01-002") == anna_records | ben_records
    assert await found(client, f"{query}=urn:other|S01-001") == set()
    assert await found(client, "Observation?subject.identifier=S01-002") == ben_records
    assert await found(client, "Observation?patient.name=müll") == anna_records
    assert await found(client, "Observation?patient:Patient.birthdate=lt1970") == anna_records | {
        response_observation_id(patients["dora"])
    }
    # Carla has no records but the response status the server keeps for every patient.
    assert await found(client, "Observation?subject:Patient.family:exact=Smith") == {
        response_observation_id(patients["carla"])
    }
    both = "Observation?subject.identifier=S01-001&subject.gender=male"
    assert await found(client, both) == set()
    dose = await _id(client, builders.administration(ben, "2025-03-03T08:00:00Z"))
    assert await found(client, f"MedicationAdministration?{query[12:]}=S01-002") == {dose}
    event = await _id(client, builders.adverse_event(ben, "2025-03-05"))
    assert await found(client, f"AdverseEvent?{query[12:]}=S01-002") == {event}


async def test_a_chain_does_not_reach_another_sites_patients(anonymous, client, patients):
    dora = patients["dora"]
    record = await _id(client, builders.platelet_count(dora, "2025-03-10T09:00:00Z", 20))
    query = "Observation?subject:Patient.identifier=S02-001"
    assert await found(anonymous, query, **bearer("admin")) == {
        record,
        response_observation_id(dora),
    }
    assert await found(anonymous, query, **bearer("investigator", ("S01",))) == set()


async def test_a_bar_before_the_code_means_a_code_without_a_system(client, patients):
    anna = patients["anna"]
    lab = await _id(
        client,
        builders.platelet_count(
            anna, "2025-03-10T09:00:00Z", 42, identifier=[{"system": "urn:lab", "value": "ORD-9"}]
        ),
    )
    # A local code as a device sends it: no system, on the code and on the identifier.
    local_body = {
        **builders.bleeding_grade(anna, "2025-03-10T09:00:00Z", 1),
        "code": {"coding": [{"code": "777-3"}]},
        "identifier": [{"value": "ORD-9"}],
    }
    local = await _id(client, local_body)
    stored = (await client.get(f"/fhir/Observation/{local}")).json()
    assert "system" not in stored["code"]["coding"][0]
    assert await found(client, "Observation?code=|777-3") == {local}
    assert await found(client, f"Observation?code={LOINC}|777-3") == {lab}
    assert await found(client, "Observation?code=777-3") == {lab, local}
    assert await found(client, "Observation?code=|718-7") == set()
    assert await found(client, "Observation?identifier=|ORD-9") == {local}
    assert await found(client, "Observation?identifier=urn:lab|ORD-9") == {lab}
    assert await found(client, "Observation?identifier=ORD-9") == {lab, local}


async def test_missing_on_a_string_and_on_references(client, patients):
    given_only = await _id(client, builders.patient("S01-004", name=[{"given": ["Eve"]}]))
    nameless = await _id(client, builders.patient("S01-005"))
    named = set(patients.values())
    everyone = named | {given_only, nameless}
    assert await found(client, "Patient?family:missing=true") == {given_only, nameless}
    assert await found(client, "Patient?family:missing=false") == named
    assert await found(client, "Patient?name:missing=true") == {nameless}
    # The site is mandatory (managingOrganization): no Patient lacks it.
    assert await found(client, "Patient?organization:missing=true") == set()
    assert await found(client, "Patient?organization:missing=false") == everyone
    # The subject is mandatory on every record: none lacks it either.
    count = await _id(client, builders.platelet_count(patients["anna"], "2025-03-10T09:00:00Z", 20))
    statuses = {response_observation_id(p) for p in everyone}
    assert await found(client, "Observation?subject:missing=true") == set()
    assert await found(client, "Observation?patient:missing=true") == set()
    assert await found(client, "Observation?subject:missing=false") == statuses | {count}
    dose = await _id(client, builders.administration(patients["ben"], "2025-03-03T08:00:00Z"))
    assert await found(client, "MedicationAdministration?subject:missing=true") == set()
    assert await found(client, "MedicationAdministration?subject:missing=false") == {dose}
    event = await _id(client, builders.adverse_event(patients["carla"], "2025-03-05"))
    assert await found(client, "AdverseEvent?subject:missing=true") == set()
    assert await found(client, "AdverseEvent?subject:missing=false") == {event}


async def test_adverse_event_identifier(client, patients):
    anna = patients["anna"]
    first_body = builders.adverse_event(anna, "2025-03-05")
    first_body["identifier"] = {"system": "urn:safety", "value": "AE-1"}
    first = await _id(client, first_body)
    second_body = builders.adverse_event(anna, "2025-03-06")
    second_body["identifier"] = {"system": "urn:safety", "value": "AE-2"}
    second = await _id(client, second_body)
    unnumbered = await _id(client, builders.adverse_event(anna, "2025-03-07"))
    assert await found(client, "AdverseEvent?identifier=urn:safety|AE-1") == {first}
    assert await found(client, "AdverseEvent?identifier=AE-2") == {second}
    assert await found(client, "AdverseEvent?identifier=AE-1,AE-2") == {first, second}
    assert await found(client, "AdverseEvent?identifier=urn:safety|") == {first, second}
    assert await found(client, "AdverseEvent?identifier=urn:other|AE-1") == set()
    assert await found(client, "AdverseEvent?identifier=AE-3") == set()
    assert await found(client, "AdverseEvent?identifier:missing=true") == {unnumbered}


@pytest.mark.parametrize(
    "resource_type", ["Observation", "MedicationAdministration", "AdverseEvent"]
)
async def test_last_updated_on_records(client, patients, resource_type):
    anna = patients["anna"]
    make = {
        "Observation": lambda day: builders.platelet_count(anna, f"2025-03-{day}T09:00:00Z", 20),
        "MedicationAdministration": lambda day: builders.administration(
            anna, f"2025-03-{day}T08:00:00Z"
        ),
        "AdverseEvent": lambda day: builders.adverse_event(anna, f"2025-03-{day}"),
    }[resource_type]
    written = {}  # id -> meta.lastUpdated (microseconds)
    for day in ("03", "04", "05"):
        body = (await create(client, make(day))).json()
        written[body["id"]] = body["meta"]["lastUpdated"]
    (first, at_first), (second, at_second), (third, at_third) = written.items()
    assert at_first < at_second < at_third
    # Observations are narrowed to the counts: each count rewrites the response status.
    query = f"{resource_type}?" + (f"code={LOINC}|777-3&" if resource_type == "Observation" else "")
    assert await found(client, f"{query}_lastUpdated=gt{at_first}") == {second, third}
    assert await found(client, f"{query}_lastUpdated=lt{at_second}") == {first}
    assert await found(client, f"{query}_lastUpdated=ge{at_second}") == {second, third}
    assert await found(client, f"{query}_lastUpdated=le{at_second}") == {first, second}
    assert await found(client, f"{query}_lastUpdated={at_second}") == {second}
    both = f"{query}_lastUpdated=gt{at_first}&_lastUpdated=lt{at_third}"
    assert await found(client, both) == {second}
    assert await found(client, f"{query}_lastUpdated=gt{at_third}") == set()
    assert await found(client, f"{query}_lastUpdated=lt{at_first}") == set()


@pytest.mark.parametrize(
    "query",
    [
        "Observation?value-quantity=abc",
        "Observation?value-quantity=5|http://unitsofmeasure.org",
        "Observation?value-quantity=NaN",
        "AdverseEvent?grade=3|x|y",
        "AdverseEvent?grade=ge",
        "Patient?name:missing=maybe",
        "Patient?birthdate=1968-02-30",
        "Patient?organization=Patient/1",
        # Reference values are ids, Type/id or a URL ending in Type/id: nothing else.
        "Patient?organization=%C2%84",
        "Observation?subject=%C2%84",
        "Observation?patient=Patient/",
        "AdverseEvent?subject=Patient/a%20b",
        # An _id is a FHIR id: another value names no resource.
        "Patient?_id=a%20b",
        "Observation?_id=ok,d%F0%9C%AA%A0",
        "Patient?_lastUpdated=yesterday",
        "Patient?name=a%00b",
    ],
)
async def test_malformed_values_are_400_outcomes(client, query):
    response = await client.get(f"/fhir/{query}")
    assert response.status_code == 400, (query, response.text)
    assert response.json()["resourceType"] == "OperationOutcome"
