"""The CapabilityStatement, built from the same tables the routes and the search parser use,
so it lists exactly what is implemented."""

from __future__ import annotations

from typing import Any

from app import __doc__ as app_doc
from app.services.conditional import conditional_parameters
from app.services.patching import JSON_PATCH, MERGE_PATCH
from app.services.search_params import INCLUDES, REVINCLUDES, SEARCH_PARAMETERS, SORT_KEYS

BULK_DATA = "http://hl7.org/fhir/uv/bulkdata"
_INTERACTIONS = (
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
)
_PROFILE_NOTES = {
    "Observation": "Platelet counts (LOINC 777-3, 26515-7) are normalised to 10^9/L; an "
    "unknown unit is refused (422). The subject must be an existing Patient.",
    "MedicationAdministration": "The subject must be an existing Patient.",
    "AdverseEvent": "The subject must be an existing Patient.",
    "Patient": "A Patient with records cannot be deleted (409).",
}


# Every stored resource type supports the same interactions and conditional forms.
_STORED_RESOURCE: dict[str, Any] = {
    "interaction": [{"code": code} for code in _INTERACTIONS],
    "versioning": "versioned-update",
    "readHistory": True,
    "updateCreate": True,
    "conditionalCreate": True,
    "conditionalRead": "not-supported",
    "conditionalUpdate": True,
    "conditionalDelete": "single",
    "referencePolicy": ["literal", "local", "enforced"],
}
_PATIENT_OPERATIONS = [
    {
        "name": "export",
        "definition": BULK_DATA + "/OperationDefinition/patient-export",
        "documentation": "GET /fhir/Patient/$export (Prefer: respond-async): "
        "every patient at the caller's sites and their records, as NDJSON",
    }
]
_AUDIT_EVENT_SEARCH = (
    ("_id", "token", "Logical id"),
    ("entity", "reference", "The resource the event is about: Type/id"),
    ("agent", "token", "Who acted: the token's sub"),
    ("date", "date", "When it was recorded; prefixes eq lt le gt ge"),
    ("action", "token", "C, R, U, D or E"),
)
# The server's own resources: read and search only.
_SERVER_RESOURCES = [
    {
        "type": "AuditEvent",
        "documentation": "The append-only audit trail: read and search only, for monitors "
        "(their sites) and admins.",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "searchParam": [
            {"name": name, "type": param_type, "documentation": text}
            for name, param_type, text in _AUDIT_EVENT_SEARCH
        ],
    },
    {
        "type": "CodeSystem",
        "documentation": "The project's own code systems (trial-codes, medication-role, "
        "itp-response); read-only.",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "searchParam": [{"name": "url", "type": "uri", "documentation": "Canonical URL"}],
    },
]
_SYSTEM_INTERACTIONS = [
    {
        "code": "transaction",
        "documentation": "POST /fhir: all or nothing in one database "
        "transaction; urn:uuid and conditional references resolved; each "
        "patient's response recomputed once; X-Provenance gives the reason of "
        "every PUT, PATCH and DELETE entry, and is required when there is one.",
    },
    {
        "code": "batch",
        "documentation": "POST /fhir: each entry on its own, with its own status and outcome.",
    },
]
_SECURITY = {
    "cors": True,
    "service": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR",
                }
            ]
        }
    ],
    "description": "Bearer JWT (role, sites, SMART v2 scopes) on every request but "
    "metadata and health; every update (a PUT that creates too), patch and delete "
    "needs an X-Provenance with a reason, whatever it finds.",
}
_SYSTEM_OPERATIONS = [
    {
        "name": "export",
        "definition": BULK_DATA + "/OperationDefinition/export",
        "documentation": "GET /fhir/$export (Prefer: respond-async; _type, "
        "_since, _outputFormat=application/fhir+ndjson): Bulk Data Access IG "
        "2.0 export of Patient, Observation, MedicationAdministration and "
        "AdverseEvent at the caller's sites (monitors and admins), as it "
        "stood at the kick-off; status at the Content-Location URL, files "
        "kept APP_EXPORT_RETENTION_HOURS; DELETE cancels. _elements, "
        "_typeFilter, patient and includeAssociatedData are refused (400).",
    },
    {
        "name": "response-status",
        "definition": "https://itp-trial.example/fhir/OperationDefinition/Patient-response-status",
        "documentation": "GET /fhir/Patient/{id}/$response-status: "
        "the patient's ITP response assessment",
    },
    {
        "name": "response-summary",
        "definition": "https://itp-trial.example/fhir/OperationDefinition/response-summary",
        "documentation": "GET /fhir/$response-summary: counts by status and best "
        "response, overall response rate",
    },
]


def capability_statement(base_url: str, software_version: str, date: str) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "publisher": "ITP trial NCT06776510 data team",
        "kind": "instance",
        "instantiates": [BULK_DATA + "/CapabilityStatement/bulk-data"],
        "software": {"name": "itp-trial-api", "version": software_version},
        "implementation": {"description": (app_doc or "").strip(), "url": base_url},
        "fhirVersion": "4.3.0",
        "format": ["application/fhir+json", "application/json"],
        "patchFormat": [JSON_PATCH, MERGE_PATCH],
        "rest": [
            {
                "mode": "server",
                "documentation": _rest_documentation(),
                "interaction": _SYSTEM_INTERACTIONS,
                "resource": [
                    *(_stored_resource(resource_type) for resource_type in SEARCH_PARAMETERS),
                    *_SERVER_RESOURCES,
                ],
                "security": _SECURITY,
                "operation": _SYSTEM_OPERATIONS,
            }
        ],
    }


def _stored_resource(resource_type: str) -> dict[str, Any]:
    """A stored resource type: what every one supports, and its own searches."""
    resource: dict[str, Any] = {
        "type": resource_type,
        "documentation": _PROFILE_NOTES[resource_type],
        **_STORED_RESOURCE,
        "searchInclude": list(INCLUDES[resource_type]),
        "searchRevInclude": list(REVINCLUDES.get(resource_type, ())),
        "searchParam": [
            {"name": p.name, "type": p.type, "documentation": p.documentation}
            for p in SEARCH_PARAMETERS[resource_type]
        ],
    }
    if resource_type == "Patient":
        resource["operation"] = _PATIENT_OPERATIONS
    # FHIR has no empty arrays.
    return {key: value for key, value in resource.items() if value != []}


def _rest_documentation() -> str:
    """The searches, modifiers, paging and conditional forms, with the sort keys and the
    conditional criteria of each resource type read from the tables that implement them."""
    sort_keys = "; ".join(
        f"{resource_type}: {', '.join(keys)}" for resource_type, keys in SORT_KEYS.items()
    )
    conditional = "; ".join(
        f"{resource_type}: {', '.join(conditional_parameters(resource_type))}"
        for resource_type in SEARCH_PARAMETERS
    )
    return (
        "Searches: GET /fhir/Type?... or POST /fhir/Type/_search (form-encoded). "
        "Modifiers: token :not :missing (system|code, |code, system|); string "
        ":exact :contains :missing; date, number, quantity and reference "
        ":missing; chains subject:Patient.<Patient parameter> (and patient.); "
        "date prefixes eq ne lt le gt ge sa eb with partial dates; number and "
        "quantity prefixes also ap (10%). Comma-separated values are OR-ed, "
        "repeated parameters AND-ed. Results: _count, _sort (comma-separated, "
        f"- descending; {sort_keys}), _total=none|accurate, "
        "_summary=count|true|text|data|false, "
        "_elements, _include, _revinclude (search.mode=include). Paging is "
        "keyset-based: follow the next link; rows written while paging never make "
        "a page skip or repeat a row. Unknown parameters are ignored with a "
        "warning (an OperationOutcome entry), or refused (400) with Prefer: "
        "handling=strict. Prefer: return=minimal|representation|OperationOutcome "
        "is honoured on create, update, patch and in Bundles. Conditional create "
        "(If-None-Exist, or the criteria in the query), conditional update "
        "(PUT Type?criteria) and single conditional delete (DELETE Type?criteria) "
        f"take token and patient criteria only ({conditional}); they are race-free. "
        "PATCH takes JSON Patch or JSON Merge Patch "
        "(also as application/json); FHIRPath Patch is not supported."
    )
