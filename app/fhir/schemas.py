"""Documentation models of the FHIR R4B JSON this API exchanges.

The routes read the raw request body and validate it once with ``fhir.resources`` (exact
and fast), so FastAPI cannot derive a schema from them. These pydantic models exist only to
describe that JSON in the OpenAPI document: a client generated from it gets typed models
(``value_quantity: Quantity``, ``status: ObservationStatus``) and schemathesis gets the
constraints the server enforces. They are never used to validate requests at runtime.

What shapes them:

- Every R4B element of each type is listed. The models forbid unknown elements, so an
  element left out would be silently dropped by a generated client.
- Field names are snake_case; the alias (used on the wire) is the FHIR JSON name.
- FHIR JSON has no ``null`` and no empty array: an optional element is documented as its
  type alone, a repeating one with ``minItems: 1``, and the models refuse both.
- A choice element ``value[x]`` is one optional field per type (``valueQuantity``,
  ``valueString``...). At most one may be present, exactly one where R4B requires the
  element (see ``FhirModel.choice_elements``).
- Required bindings are enums; primitive types carry the R4B regular expressions.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    Strict,
    StringConstraints,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from app.kit import codes
from app.kit.dates import (
    DATE_ELEMENT_PATTERN,
    DATE_TIME_ELEMENT_PATTERN,
    INSTANT_ELEMENT_PATTERN,
    TIME,
    real_calendar_date,
)
from app.kit.limits import MAX_INDEXED_STRING

# ---------------------------------------------------------------------------------------
# Code sets (R4B value sets of the required bindings)
# ---------------------------------------------------------------------------------------


class AdministrativeGender(StrEnum):
    male = "male"
    female = "female"
    other = "other"
    unknown = "unknown"


class NarrativeStatus(StrEnum):
    generated = "generated"
    extensions = "extensions"
    additional = "additional"
    empty = "empty"


class IdentifierUse(StrEnum):
    usual = "usual"
    official = "official"
    temp = "temp"
    secondary = "secondary"
    old = "old"


class NameUse(StrEnum):
    usual = "usual"
    official = "official"
    temp = "temp"
    nickname = "nickname"
    anonymous = "anonymous"
    old = "old"
    maiden = "maiden"


class ContactPointSystem(StrEnum):
    phone = "phone"
    fax = "fax"
    email = "email"
    pager = "pager"
    url = "url"
    sms = "sms"
    other = "other"


class ContactPointUse(StrEnum):
    home = "home"
    work = "work"
    temp = "temp"
    old = "old"
    mobile = "mobile"


class AddressUse(StrEnum):
    home = "home"
    work = "work"
    temp = "temp"
    old = "old"
    billing = "billing"


class AddressType(StrEnum):
    postal = "postal"
    physical = "physical"
    both = "both"


class QuantityComparator(StrEnum):
    lt = "<"
    le = "<="
    ge = ">="
    gt = ">"


class DaysOfWeek(StrEnum):
    mon = "mon"
    tue = "tue"
    wed = "wed"
    thu = "thu"
    fri = "fri"
    sat = "sat"
    sun = "sun"


class UnitsOfTime(StrEnum):
    s = "s"
    min = "min"
    h = "h"
    d = "d"
    wk = "wk"
    mo = "mo"
    a = "a"


class EventTiming(StrEnum):
    MORN = "MORN"
    MORN_early = "MORN.early"
    MORN_late = "MORN.late"
    NOON = "NOON"
    AFT = "AFT"
    AFT_early = "AFT.early"
    AFT_late = "AFT.late"
    EVE = "EVE"
    EVE_early = "EVE.early"
    EVE_late = "EVE.late"
    NIGHT = "NIGHT"
    PHS = "PHS"
    HS = "HS"
    WAKE = "WAKE"
    C = "C"
    CM = "CM"
    CD = "CD"
    CV = "CV"
    AC = "AC"
    ACM = "ACM"
    ACD = "ACD"
    ACV = "ACV"
    PC = "PC"
    PCM = "PCM"
    PCD = "PCD"
    PCV = "PCV"


class ContributorType(StrEnum):
    author = "author"
    editor = "editor"
    reviewer = "reviewer"
    endorser = "endorser"


class SortDirection(StrEnum):
    ascending = "ascending"
    descending = "descending"


class OperationParameterUse(StrEnum):
    in_ = "in"
    out = "out"


class RelatedArtifactType(StrEnum):
    documentation = "documentation"
    justification = "justification"
    citation = "citation"
    predecessor = "predecessor"
    successor = "successor"
    derived_from = "derived-from"
    depends_on = "depends-on"
    composed_of = "composed-of"


class TriggerType(StrEnum):
    named_event = "named-event"
    periodic = "periodic"
    data_changed = "data-changed"
    data_added = "data-added"
    data_modified = "data-modified"
    data_removed = "data-removed"
    data_accessed = "data-accessed"
    data_access_ended = "data-access-ended"


class LinkType(StrEnum):
    replaced_by = "replaced-by"
    replaces = "replaces"
    refer = "refer"
    seealso = "seealso"


class ObservationStatus(StrEnum):
    registered = "registered"
    preliminary = "preliminary"
    final = "final"
    amended = "amended"
    corrected = "corrected"
    cancelled = "cancelled"
    entered_in_error = "entered-in-error"
    unknown = "unknown"


class MedicationAdministrationStatus(StrEnum):
    in_progress = "in-progress"
    not_done = "not-done"
    on_hold = "on-hold"
    completed = "completed"
    entered_in_error = "entered-in-error"
    stopped = "stopped"
    unknown = "unknown"


class AdverseEventActuality(StrEnum):
    actual = "actual"
    potential = "potential"


class BundleType(StrEnum):
    document = "document"
    message = "message"
    transaction = "transaction"
    transaction_response = "transaction-response"
    batch = "batch"
    batch_response = "batch-response"
    history = "history"
    searchset = "searchset"
    collection = "collection"


class HTTPVerb(StrEnum):
    GET = "GET"
    HEAD = "HEAD"
    POST = "POST"
    PUT = "PUT"
    DELETE = "DELETE"
    PATCH = "PATCH"


class SearchEntryMode(StrEnum):
    match = "match"
    include = "include"
    outcome = "outcome"


class IssueSeverity(StrEnum):
    fatal = "fatal"
    error = "error"
    warning = "warning"
    information = "information"


class IssueType(StrEnum):
    invalid = "invalid"
    structure = "structure"
    required = "required"
    value = "value"
    invariant = "invariant"
    security = "security"
    login = "login"
    unknown = "unknown"
    expired = "expired"
    forbidden = "forbidden"
    suppressed = "suppressed"
    processing = "processing"
    not_supported = "not-supported"
    duplicate = "duplicate"
    multiple_matches = "multiple-matches"
    not_found = "not-found"
    deleted = "deleted"
    too_long = "too-long"
    code_invalid = "code-invalid"
    extension = "extension"
    too_costly = "too-costly"
    business_rule = "business-rule"
    conflict = "conflict"
    transient = "transient"
    lock_error = "lock-error"
    no_store = "no-store"
    exception = "exception"
    timeout = "timeout"
    incomplete = "incomplete"
    throttled = "throttled"
    informational = "informational"


class PublicationStatus(StrEnum):
    draft = "draft"
    active = "active"
    retired = "retired"
    unknown = "unknown"


class CapabilityStatementKind(StrEnum):
    instance = "instance"
    capability = "capability"
    requirements = "requirements"


class RestfulCapabilityMode(StrEnum):
    client = "client"
    server = "server"


class TypeRestfulInteraction(StrEnum):
    read = "read"
    vread = "vread"
    update = "update"
    patch = "patch"
    delete = "delete"
    history_instance = "history-instance"
    history_type = "history-type"
    create = "create"
    search_type = "search-type"


class SystemRestfulInteraction(StrEnum):
    transaction = "transaction"
    batch = "batch"
    search_system = "search-system"
    history_system = "history-system"


class ResourceVersionPolicy(StrEnum):
    no_version = "no-version"
    versioned = "versioned"
    versioned_update = "versioned-update"


class ConditionalReadStatus(StrEnum):
    not_supported = "not-supported"
    modified_since = "modified-since"
    not_match = "not-match"
    full_support = "full-support"


class ConditionalDeleteStatus(StrEnum):
    not_supported = "not-supported"
    single = "single"
    multiple = "multiple"


class ReferenceHandlingPolicy(StrEnum):
    literal = "literal"
    logical = "logical"
    resolves = "resolves"
    enforced = "enforced"
    local = "local"


class SearchParamType(StrEnum):
    number = "number"
    date = "date"
    string = "string"
    token = "token"
    reference = "reference"
    composite = "composite"
    quantity = "quantity"
    uri = "uri"
    special = "special"


# ---------------------------------------------------------------------------------------
# Primitive types (R4B regular expressions, anchored: JSON Schema patterns are searches)
# ---------------------------------------------------------------------------------------


def _pattern(regex: str, max_length: int | None = None) -> StringConstraints:
    return StringConstraints(min_length=1, max_length=max_length, pattern=f"^{regex}$")


String = Annotated[str, _pattern(codes.STRING_PATTERN)]
# What the server indexes for search (identifiers, codings, a quantity's unit, name parts):
# at most MAX_INDEXED_STRING characters, the same limit on both databases (README).
IndexedString = Annotated[str, _pattern(codes.STRING_PATTERN, MAX_INDEXED_STRING)]
IndexedCode = Annotated[str, _pattern(codes.CODE_PATTERN, MAX_INDEXED_STRING)]
IndexedUri = Annotated[str, _pattern(codes.URI_PATTERN, MAX_INDEXED_STRING)]
Markdown = String
Xhtml = Annotated[str, StringConstraints(min_length=1)]
Code = Annotated[str, _pattern(codes.CODE_PATTERN)]
Id = Annotated[str, _pattern(r"[A-Za-z0-9\-\.]{1,64}")]
Uri = Annotated[str, _pattern(codes.URI_PATTERN)]
Url = Uri
Canonical = Uri
Oid = Annotated[str, _pattern(r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+")]
Uuid = Annotated[
    str, _pattern(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
]
# The R4B regex leaves out "/", which is part of the base64 alphabet (corrected in R5).
Base64Binary = Annotated[str, _pattern(r"(\s*([0-9a-zA-Z\+/=]){4}\s*)+")]

Date = Annotated[str, _pattern(DATE_ELEMENT_PATTERN), AfterValidator(real_calendar_date)]
DateTime = Annotated[str, _pattern(DATE_TIME_ELEMENT_PATTERN), AfterValidator(real_calendar_date)]
Instant = Annotated[str, _pattern(INSTANT_ELEMENT_PATTERN), AfterValidator(real_calendar_date)]
Time = Annotated[str, _pattern(TIME)]

Boolean = Annotated[bool, Strict()]
Integer = Annotated[int, Strict(), Field(ge=-2147483648, le=2147483647)]
UnsignedInt = Annotated[int, Strict(), Field(ge=0, le=2147483647)]
PositiveInt = Annotated[int, Strict(), Field(ge=1, le=2147483647)]
Decimal = Annotated[float, Strict(), Field(allow_inf_nan=False)]

_T = TypeVar("_T")
# A repeating element: FHIR JSON never carries an empty array.
Repeated = Annotated[list[_T], Field(min_length=1)]


# ---------------------------------------------------------------------------------------
# Base models
# ---------------------------------------------------------------------------------------


class FhirModel(BaseModel):
    """Base of every documentation model: wire names, no null, choice elements."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        alias_generator=to_camel,
        serialize_by_alias=True,
        defer_build=True,  # built at the end of the module
    )

    # Choice elements of this type by name without "[x]" (e.g. "value"), True when R4B
    # requires one. Their variants are the fields whose wire name is the name + a type.
    choice_elements: ClassVar[dict[str, bool]] = {}
    _choice_variants: ClassVar[dict[str, tuple[tuple[str, str], ...]]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._choice_variants = {}
        for choice in cls.choice_elements:
            # Wire names come from the alias generator: the aliases themselves are not set
            # yet on fields whose type is still a forward reference.
            wire_names = ((name, to_camel(name)) for name in cls.model_fields)
            variants = tuple(
                (name, wire_name)
                for name, wire_name in wire_names
                if wire_name.startswith(choice)
                and wire_name[len(choice) : len(choice) + 1].isupper()
            )
            if len(variants) < 2:
                raise TypeError(f"{cls.__name__}: {choice}[x] has fewer than two variants")
            cls._choice_variants[choice] = variants

    @model_validator(mode="before")
    @classmethod
    def _refuse_null(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulls = [key for key, value in data.items() if value is None]
            if nulls:
                raise ValueError(f"FHIR JSON has no null; omit the element instead: {nulls}")
        return data

    @model_validator(mode="after")
    def _one_variant_per_choice(self) -> Self:
        for choice, variants in self._choice_variants.items():
            present = [alias for name, alias in variants if getattr(self, name) is not None]
            if len(present) > 1:
                raise ValueError(f"{choice}[x] takes one type only, got {present}")
            if not present and self.choice_elements[choice]:
                aliases = [alias for _, alias in variants]
                raise ValueError(f"{choice}[x] is required: one of {aliases}")
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(core_schema)
        schema = handler.resolve_ref_schema(json_schema)
        for prop in schema.get("properties", {}).values():
            # An absent element is omitted, never null: document the type alone.
            prop.pop("title", None)
            if "default" in prop and prop["default"] is None:
                del prop["default"]
            options = prop.pop("anyOf", None)
            if options is not None:
                options = [option for option in options if option != {"type": "null"}]
                if len(options) == 1:
                    prop.update(options[0])
                else:
                    prop["anyOf"] = options
        rules: list[dict[str, Any]] = []
        for choice, variants in cls._choice_variants.items():
            one_each = [{"required": [alias]} for _, alias in variants]
            if cls.choice_elements[choice]:
                # Exactly one of the variants.
                rules.append({"oneOf": one_each})
            else:
                # At most one: none of them, or exactly one. Spelled as a oneOf of n + 1
                # branches rather than "no two together", whose n(n-1)/2 pairs (1,275 for
                # Extension.value[x]) outgrow what schemathesis's generator can canonicalise.
                rules.append({"oneOf": [{"not": {"anyOf": one_each}}, *one_each]})
        if rules:
            # Written as not-not because a top-level oneOf/allOf makes openapi-python-client
            # turn the whole model into a union, while it ignores "not"; JSON Schema
            # validators (schemathesis) apply it.
            schema["not"] = {"not": {"allOf": rules}}
        return json_schema


class Element(FhirModel):
    """Base of every datatype: an id and extensions.

    FHIR's ele-1 (every element has a value or children) is minProperties: 1, so a client
    generator and a fuzzer know that `{}` is not an element."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    id: String | None = None
    extension: Repeated[Extension] | None = None


class BackboneElement(Element):
    """An element nested in a resource (or Timing, Dosage), which may carry modifiers."""

    modifier_extension: Repeated[Extension] | None = None


# ---------------------------------------------------------------------------------------
# Datatypes
# ---------------------------------------------------------------------------------------


class Extension(Element):
    """An extension: its url names it, value[x] carries its value (or nested extensions)."""

    choice_elements = {"value": False}

    url: Uri
    value_base64_binary: Base64Binary | None = None
    value_boolean: Boolean | None = None
    value_canonical: Canonical | None = None
    value_code: Code | None = None
    value_date: Date | None = None
    value_date_time: DateTime | None = None
    value_decimal: Decimal | None = None
    value_id: Id | None = None
    value_instant: Instant | None = None
    value_integer: Integer | None = None
    value_markdown: Markdown | None = None
    value_oid: Oid | None = None
    value_positive_int: PositiveInt | None = None
    value_string: String | None = None
    value_time: Time | None = None
    value_unsigned_int: UnsignedInt | None = None
    value_uri: Uri | None = None
    value_url: Url | None = None
    value_uuid: Uuid | None = None
    value_address: Address | None = None
    value_age: Age | None = None
    value_annotation: Annotation | None = None
    value_attachment: Attachment | None = None
    value_codeable_concept: CodeableConcept | None = None
    value_codeable_reference: CodeableReference | None = None
    value_coding: Coding | None = None
    value_contact_point: ContactPoint | None = None
    value_count: Count | None = None
    value_distance: Distance | None = None
    value_duration: Duration | None = None
    value_human_name: HumanName | None = None
    value_identifier: Identifier | None = None
    value_money: Money | None = None
    value_period: Period | None = None
    value_quantity: Quantity | None = None
    value_range: Range | None = None
    value_ratio: Ratio | None = None
    value_ratio_range: RatioRange | None = None
    value_reference: Reference | None = None
    value_sampled_data: SampledData | None = None
    value_signature: Signature | None = None
    value_timing: Timing | None = None
    value_contact_detail: ContactDetail | None = None
    value_contributor: Contributor | None = None
    value_data_requirement: DataRequirement | None = None
    value_expression: Expression | None = None
    value_parameter_definition: ParameterDefinition | None = None
    value_related_artifact: RelatedArtifact | None = None
    value_trigger_definition: TriggerDefinition | None = None
    value_usage_context: UsageContext | None = None
    value_dosage: Dosage | None = None


class Coding(Element):
    """A code from a code system."""

    system: IndexedUri | None = None
    version: String | None = None
    code: IndexedCode | None = None
    display: String | None = None
    user_selected: Boolean | None = None


class CodeableConcept(Element):
    """A concept given by codings and/or text."""

    coding: Repeated[Coding] | None = None
    text: String | None = None


class CodeableReference(Element):
    """A reference to a resource or a concept."""

    concept: CodeableConcept | None = None
    reference: Reference | None = None


class Period(Element):
    """A time range given by start and/or end."""

    start: DateTime | None = None
    end: DateTime | None = None


class Identifier(Element):
    """A business identifier: a value in the namespace of a system."""

    use: IdentifierUse | None = None
    type: CodeableConcept | None = None
    system: IndexedUri | None = None
    value: IndexedString | None = None
    period: Period | None = None
    assigner: Reference | None = None


class Reference(Element):
    """A literal (reference), logical (identifier) or display-only reference."""

    reference: String | None = None
    type: Uri | None = None
    identifier: Identifier | None = None
    display: String | None = None


class PatientReference(Reference):
    """The trial Patient a record belongs to: a literal `Patient/<id>` reference."""

    reference: Annotated[str, StringConstraints(pattern=codes.PATIENT_REFERENCE_PATTERN)]


class SiteIdentifier(Identifier):
    """A trial site code in the site identifier system."""

    system: Literal["https://itp-trial.example/fhir/sid/site"]
    value: Annotated[str, StringConstraints(pattern=codes.SITE_CODE_PATTERN)]


class SiteReference(Reference):
    """The trial site, by its identifier."""

    identifier: SiteIdentifier


class SimpleQuantity(Element):
    """A Quantity without comparator (R4B profile SimpleQuantity, sqty-1)."""

    value: Decimal | None = None
    unit: IndexedString | None = None
    system: IndexedUri | None = None
    code: IndexedCode | None = None


class Quantity(SimpleQuantity):
    """A measured amount; with code, system is required (qty-3), UCUM preferred."""

    comparator: QuantityComparator | None = None


class Age(Quantity):
    """A duration of time in a living entity (UCUM units of time, positive value)."""


class Count(Quantity):
    """A count of a discrete element (UCUM code "1", integer value)."""


class Distance(Quantity):
    """A length (UCUM units of length)."""


class Duration(Quantity):
    """A length of time (UCUM units of time)."""


class Money(Element):
    """An amount of an ISO 4217 currency."""

    value: Decimal | None = None
    currency: Code | None = None


class Range(Element):
    """A range of quantities, low and/or high inclusive."""

    low: SimpleQuantity | None = None
    high: SimpleQuantity | None = None


class Ratio(Element):
    """A ratio of two quantities."""

    numerator: Quantity | None = None
    denominator: Quantity | None = None


class RatioRange(Element):
    """A range of ratios sharing one denominator."""

    low_numerator: SimpleQuantity | None = None
    high_numerator: SimpleQuantity | None = None
    denominator: SimpleQuantity | None = None


class SampledData(Element):
    """A series of measurements taken by a device."""

    origin: SimpleQuantity
    period: Decimal
    factor: Decimal | None = None
    lower_limit: Decimal | None = None
    upper_limit: Decimal | None = None
    dimensions: PositiveInt
    data: String | None = None


class Attachment(Element):
    """Content inline (base64 data) or by url."""

    content_type: Code | None = None
    language: Code | None = None
    data: Base64Binary | None = None
    url: Url | None = None
    size: UnsignedInt | None = None
    hash: Base64Binary | None = None
    title: String | None = None
    creation: DateTime | None = None


class Annotation(Element):
    """A text note with author and time."""

    choice_elements = {"author": False}

    author_reference: Reference | None = None
    author_string: String | None = None
    time: DateTime | None = None
    text: Markdown


class HumanName(Element):
    """A person's name."""

    use: NameUse | None = None
    text: IndexedString | None = None
    family: IndexedString | None = None
    given: Repeated[IndexedString] | None = None
    prefix: Repeated[IndexedString] | None = None
    suffix: Repeated[IndexedString] | None = None
    period: Period | None = None


class ContactPoint(Element):
    """A phone number, email address or other telecom contact."""

    system: ContactPointSystem | None = None
    value: String | None = None
    use: ContactPointUse | None = None
    rank: PositiveInt | None = None
    period: Period | None = None


class Address(Element):
    """A postal or physical address."""

    use: AddressUse | None = None
    type: AddressType | None = None
    text: String | None = None
    line: Repeated[String] | None = None
    city: String | None = None
    district: String | None = None
    state: String | None = None
    postal_code: String | None = None
    country: String | None = None
    period: Period | None = None


class ContactDetail(Element):
    """A contact: a name and telecom details."""

    name: String | None = None
    telecom: Repeated[ContactPoint] | None = None


class Contributor(Element):
    """A contributor to the content of a knowledge asset."""

    type: ContributorType
    name: String
    contact: Repeated[ContactDetail] | None = None


class Signature(Element):
    """A digital signature."""

    type: Repeated[Coding]
    when: Instant
    who: Reference
    on_behalf_of: Reference | None = None
    target_format: Code | None = None
    sig_format: Code | None = None
    data: Base64Binary | None = None


class Meta(Element):
    """Metadata the server maintains: version, last update, profiles, tags."""

    version_id: Id | None = None
    last_updated: Instant | None = None
    source: Uri | None = None
    profile: Repeated[Canonical] | None = None
    security: Repeated[Coding] | None = None
    tag: Repeated[Coding] | None = None


class Narrative(Element):
    """Human-readable XHTML summary of a resource."""

    status: NarrativeStatus
    div: Xhtml


class TimingRepeat(Element):
    """When a timed event repeats."""

    choice_elements = {"bounds": False}

    bounds_duration: Duration | None = None
    bounds_range: Range | None = None
    bounds_period: Period | None = None
    count: PositiveInt | None = None
    count_max: PositiveInt | None = None
    duration: Decimal | None = None
    duration_max: Decimal | None = None
    duration_unit: UnitsOfTime | None = None
    frequency: PositiveInt | None = None
    frequency_max: PositiveInt | None = None
    period: Decimal | None = None
    period_max: Decimal | None = None
    period_unit: UnitsOfTime | None = None
    day_of_week: Repeated[DaysOfWeek] | None = None
    time_of_day: Repeated[Time] | None = None
    when: Repeated[EventTiming] | None = None
    offset: UnsignedInt | None = None


class Timing(BackboneElement):
    """An event that may occur multiple times."""

    event: Repeated[DateTime] | None = None
    repeat: TimingRepeat | None = None
    code: CodeableConcept | None = None


class DosageDoseAndRate(Element):
    """Amount of medication per dose and/or per time."""

    choice_elements = {"dose": False, "rate": False}

    type: CodeableConcept | None = None
    dose_range: Range | None = None
    dose_quantity: SimpleQuantity | None = None
    rate_ratio: Ratio | None = None
    rate_range: Range | None = None
    rate_quantity: SimpleQuantity | None = None


class Dosage(BackboneElement):
    """How a medication is or should be taken."""

    choice_elements = {"asNeeded": False}

    sequence: Integer | None = None
    text: String | None = None
    additional_instruction: Repeated[CodeableConcept] | None = None
    patient_instruction: String | None = None
    timing: Timing | None = None
    as_needed_boolean: Boolean | None = None
    as_needed_codeable_concept: CodeableConcept | None = None
    site: CodeableConcept | None = None
    route: CodeableConcept | None = None
    method: CodeableConcept | None = None
    dose_and_rate: Repeated[DosageDoseAndRate] | None = None
    max_dose_per_period: Ratio | None = None
    max_dose_per_administration: SimpleQuantity | None = None
    max_dose_per_lifetime: SimpleQuantity | None = None


class DataRequirementCodeFilter(Element):
    """A code-valued filter of a data requirement."""

    path: String | None = None
    search_param: String | None = None
    value_set: Canonical | None = None
    code: Repeated[Coding] | None = None


class DataRequirementDateFilter(Element):
    """A date-valued filter of a data requirement."""

    choice_elements = {"value": False}

    path: String | None = None
    search_param: String | None = None
    value_date_time: DateTime | None = None
    value_period: Period | None = None
    value_duration: Duration | None = None


class DataRequirementSort(Element):
    """The order of the results of a data requirement."""

    path: String
    direction: SortDirection


class DataRequirement(Element):
    """A requirement for data of a given type."""

    choice_elements = {"subject": False}

    type: Code
    profile: Repeated[Canonical] | None = None
    subject_codeable_concept: CodeableConcept | None = None
    subject_reference: Reference | None = None
    must_support: Repeated[String] | None = None
    code_filter: Repeated[DataRequirementCodeFilter] | None = None
    date_filter: Repeated[DataRequirementDateFilter] | None = None
    limit: PositiveInt | None = None
    sort: Repeated[DataRequirementSort] | None = None


class Expression(Element):
    """An expression (FHIRPath, CQL, FHIR query) in a given language."""

    description: String | None = None
    name: Id | None = None
    language: Code
    expression: String | None = None
    reference: Uri | None = None


class ParameterDefinition(Element):
    """A parameter of a module or operation."""

    name: Code | None = None
    use: OperationParameterUse
    min: Integer | None = None
    max: String | None = None
    documentation: String | None = None
    type: Code
    profile: Canonical | None = None


class RelatedArtifact(Element):
    """A related document, citation or knowledge resource."""

    type: RelatedArtifactType
    label: String | None = None
    display: String | None = None
    citation: Markdown | None = None
    url: Url | None = None
    document: Attachment | None = None
    resource: Canonical | None = None


class TriggerDefinition(Element):
    """A triggering event: named, periodic or data."""

    choice_elements = {"timing": False}

    type: TriggerType
    name: String | None = None
    timing_timing: Timing | None = None
    timing_reference: Reference | None = None
    timing_date: Date | None = None
    timing_date_time: DateTime | None = None
    data: Repeated[DataRequirement] | None = None
    condition: Expression | None = None


class UsageContext(Element):
    """The context a resource is intended for."""

    choice_elements = {"value": True}

    code: Coding
    value_codeable_concept: CodeableConcept | None = None
    value_quantity: Quantity | None = None
    value_range: Range | None = None
    value_reference: Reference | None = None


# ---------------------------------------------------------------------------------------
# Backbone elements of the resources
# ---------------------------------------------------------------------------------------


class PatientContact(BackboneElement):
    """A contact party (guardian, partner, friend) for the patient."""

    relationship: Repeated[CodeableConcept] | None = None
    name: HumanName | None = None
    telecom: Repeated[ContactPoint] | None = None
    address: Address | None = None
    gender: AdministrativeGender | None = None
    organization: Reference | None = None
    period: Period | None = None


class PatientCommunication(BackboneElement):
    """A language the patient may use about their health."""

    language: CodeableConcept
    preferred: Boolean | None = None


class PatientLink(BackboneElement):
    """A link to another Patient or RelatedPerson about the same person."""

    other: Reference
    type: LinkType


class ObservationReferenceRange(BackboneElement):
    """A range of normal or recommended values."""

    low: SimpleQuantity | None = None
    high: SimpleQuantity | None = None
    type: CodeableConcept | None = None
    applies_to: Repeated[CodeableConcept] | None = None
    age: Range | None = None
    text: String | None = None


class ObservationComponent(BackboneElement):
    """A component observation, e.g. one of the parts of the response assessment."""

    choice_elements = {"value": False}

    code: CodeableConcept
    value_quantity: Quantity | None = None
    value_codeable_concept: CodeableConcept | None = None
    value_string: String | None = None
    value_boolean: Boolean | None = None
    value_integer: Integer | None = None
    value_range: Range | None = None
    value_ratio: Ratio | None = None
    value_sampled_data: SampledData | None = None
    value_time: Time | None = None
    value_date_time: DateTime | None = None
    value_period: Period | None = None
    data_absent_reason: CodeableConcept | None = None
    interpretation: Repeated[CodeableConcept] | None = None
    reference_range: Repeated[ObservationReferenceRange] | None = None


class MedicationAdministrationPerformer(BackboneElement):
    """Who administered the medication."""

    function: CodeableConcept | None = None
    actor: Reference


class MedicationAdministrationDosage(BackboneElement):
    """How the medication was given: route, dose, rate."""

    choice_elements = {"rate": False}

    text: String | None = None
    site: CodeableConcept | None = None
    route: CodeableConcept | None = None
    method: CodeableConcept | None = None
    dose: SimpleQuantity | None = None
    rate_ratio: Ratio | None = None
    rate_quantity: SimpleQuantity | None = None


class AdverseEventSuspectEntityCausality(BackboneElement):
    """An assessment of whether the suspect entity caused the event."""

    assessment: CodeableConcept | None = Field(
        default=None,
        description="http://terminology.hl7.org/CodeSystem/adverse-event-causality-assess",
    )
    product_relatedness: String | None = None
    author: Reference | None = None
    method: CodeableConcept | None = None


class AdverseEventSuspectEntity(BackboneElement):
    """A product or procedure suspected of causing the event."""

    instance: Reference
    causality: Repeated[AdverseEventSuspectEntityCausality] | None = None


class OperationOutcomeIssue(BackboneElement):
    """One error, warning or information message."""

    severity: IssueSeverity
    code: IssueType
    details: CodeableConcept | None = None
    diagnostics: String | None = None
    location: Repeated[String] | None = None
    expression: Repeated[String] | None = Field(
        default=None, description="FHIRPath of the offending element(s)"
    )


class BundleLink(BackboneElement):
    """A link of the bundle or entry: self, next, previous..."""

    relation: String
    url: Uri


class BundleEntrySearch(BackboneElement):
    """Why an entry is in a searchset."""

    mode: SearchEntryMode | None = None
    score: Decimal | None = None


class BundleEntryRequest(BackboneElement):
    """The request of a transaction/batch/history entry."""

    method: HTTPVerb
    url: Uri
    if_none_match: String | None = None
    if_modified_since: Instant | None = None
    if_match: String | None = None
    if_none_exist: String | None = None


class BundleEntryResponse(BackboneElement):
    """The outcome of a transaction/batch entry, or the version of a history entry."""

    status: String
    location: Uri | None = None
    etag: String | None = None
    last_modified: Instant | None = None
    outcome: OperationOutcome | None = None


class BundleEntry(BackboneElement):
    """One entry: a resource, with search, request or response details."""

    link: Repeated[BundleLink] | None = None
    full_url: Uri | None = None
    resource: BundleResource | None = None
    search: BundleEntrySearch | None = None
    request: BundleEntryRequest | None = None
    response: BundleEntryResponse | None = None


# ---------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------


class Resource(FhirModel):
    """Elements every resource has."""

    # Each resource narrows it to a Literal; declared here so that it comes first.
    resource_type: str
    id: Id | None = None
    meta: Meta | None = None
    implicit_rules: Uri | None = None
    language: Code | None = None


class DomainResource(Resource):
    """A resource with narrative and extensions. R4B's `contained` is left out: the trial
    profile takes no contained resources (README, "What is refused"); the server refuses them."""

    text: Narrative | None = None
    extension: Repeated[Extension] | None = None
    modifier_extension: Repeated[Extension] | None = None


class Patient(DomainResource):
    """A trial subject: subject number (identifier), site (managingOrganization), sex,
    birth date."""

    choice_elements = {"deceased": False, "multipleBirth": False}

    resource_type: Literal["Patient"]
    identifier: Repeated[Identifier] | None = None
    active: Boolean | None = None
    name: Repeated[HumanName] | None = None
    telecom: Repeated[ContactPoint] | None = None
    gender: AdministrativeGender | None = None
    birth_date: Date | None = None
    deceased_boolean: Boolean | None = None
    deceased_date_time: DateTime | None = None
    address: Repeated[Address] | None = None
    marital_status: CodeableConcept | None = None
    multiple_birth_boolean: Boolean | None = None
    multiple_birth_integer: Integer | None = None
    photo: Repeated[Attachment] | None = None
    contact: Repeated[PatientContact] | None = None
    communication: Repeated[PatientCommunication] | None = None
    general_practitioner: Repeated[Reference] | None = None
    managing_organization: SiteReference = Field(
        description="The trial site, as identifier "
        "{system: https://itp-trial.example/fhir/sid/site, value: site code}",
    )
    link: Repeated[PatientLink] | None = None


class Observation(DomainResource):
    """A platelet count, a WHO bleeding grade or a response assessment."""

    choice_elements = {"effective": False, "value": False}

    resource_type: Literal["Observation"]
    identifier: Repeated[Identifier] | None = None
    based_on: Repeated[Reference] | None = None
    part_of: Repeated[Reference] | None = None
    status: ObservationStatus
    category: Repeated[CodeableConcept] | None = None
    code: CodeableConcept
    subject: PatientReference
    focus: Repeated[Reference] | None = None
    encounter: Reference | None = None
    effective_date_time: DateTime | None = None
    effective_period: Period | None = None
    effective_timing: Timing | None = None
    effective_instant: Instant | None = None
    issued: Instant | None = None
    performer: Repeated[Reference] | None = None
    value_quantity: Quantity | None = None
    value_codeable_concept: CodeableConcept | None = None
    value_string: String | None = None
    value_boolean: Boolean | None = None
    value_integer: Integer | None = None
    value_range: Range | None = None
    value_ratio: Ratio | None = None
    value_sampled_data: SampledData | None = None
    value_time: Time | None = None
    value_date_time: DateTime | None = None
    value_period: Period | None = None
    data_absent_reason: CodeableConcept | None = None
    interpretation: Repeated[CodeableConcept] | None = None
    note: Repeated[Annotation] | None = None
    body_site: CodeableConcept | None = None
    method: CodeableConcept | None = None
    specimen: Reference | None = None
    device: Reference | None = None
    reference_range: Repeated[ObservationReferenceRange] | None = None
    has_member: Repeated[Reference] | None = None
    derived_from: Repeated[Reference] | None = None
    component: Repeated[ObservationComponent] | None = None


class MedicationAdministration(DomainResource):
    """A dose of study drug, a rescue treatment or a concomitant ITP drug."""

    choice_elements = {"medication": True, "effective": True}

    resource_type: Literal["MedicationAdministration"]
    identifier: Repeated[Identifier] | None = None
    instantiates: Repeated[Uri] | None = None
    part_of: Repeated[Reference] | None = None
    status: MedicationAdministrationStatus
    status_reason: Repeated[CodeableConcept] | None = None
    category: CodeableConcept | None = Field(
        default=None,
        description="The medication role: "
        "https://itp-trial.example/fhir/CodeSystem/medication-role "
        "(study-drug | rescue | concomitant); none means concomitant",
    )
    medication_codeable_concept: CodeableConcept | None = None
    medication_reference: Reference | None = None
    subject: PatientReference
    context: Reference | None = None
    supporting_information: Repeated[Reference] | None = None
    effective_date_time: DateTime | None = None
    effective_period: Period | None = None
    performer: Repeated[MedicationAdministrationPerformer] | None = None
    reason_code: Repeated[CodeableConcept] | None = None
    reason_reference: Repeated[Reference] | None = None
    request: Reference | None = None
    device: Repeated[Reference] | None = None
    note: Repeated[Annotation] | None = None
    dosage: MedicationAdministrationDosage | None = None
    event_history: Repeated[Reference] | None = None


class AdverseEvent(DomainResource):
    """An adverse event, with CTCAE grade (ae-grade extension), seriousness, causality
    and outcome."""

    resource_type: Literal["AdverseEvent"]
    identifier: Identifier | None = None
    actuality: AdverseEventActuality
    category: Repeated[CodeableConcept] | None = None
    event: CodeableConcept | None = None
    subject: PatientReference
    encounter: Reference | None = None
    date: DateTime | None = None
    detected: DateTime | None = None
    recorded_date: DateTime | None = None
    resulting_condition: Repeated[Reference] | None = None
    location: Reference | None = None
    seriousness: CodeableConcept | None = Field(
        default=None,
        description="http://terminology.hl7.org/CodeSystem/adverse-event-seriousness "
        "(serious | non-serious)",
    )
    severity: CodeableConcept | None = Field(
        default=None,
        description="Required binding: "
        "http://terminology.hl7.org/CodeSystem/adverse-event-severity "
        "(mild | moderate | severe)",
    )
    outcome: CodeableConcept | None = Field(
        default=None,
        description="Required binding: "
        "http://terminology.hl7.org/CodeSystem/adverse-event-outcome "
        "(resolved | recovering | ongoing | resolvedWithSequelae | fatal | unknown)",
    )
    recorder: Reference | None = None
    contributor: Repeated[Reference] | None = None
    suspect_entity: Repeated[AdverseEventSuspectEntity] | None = None
    subject_medical_history: Repeated[Reference] | None = None
    reference_document: Repeated[Reference] | None = None
    study: Repeated[Reference] | None = None


class OperationOutcome(DomainResource):
    """The outcome of a request: every error and warning the server returns."""

    resource_type: Literal["OperationOutcome"]
    issue: Repeated[OperationOutcomeIssue]


# The resources a Bundle of this server carries, told apart by resourceType.
class AuditEvent(DomainResource):
    """A record of the audit trail (GET /fhir/AuditEvent). Written by the server only and
    never sent by clients, so it documents what the server emits and lets R4B's other
    AuditEvent elements through (extra="allow") rather than listing all of them."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    resource_type: Literal["AuditEvent"]
    type: Coding
    subtype: Repeated[Coding] | None = None
    action: Literal["C", "R", "U", "D", "E"] | None = None
    recorded: Instant
    outcome: Literal["0", "4", "8", "12"] | None = None
    outcome_desc: String | None = None
    agent: Repeated[dict[str, Any]]
    source: dict[str, Any]
    entity: Repeated[dict[str, Any]] | None = None


BundleResource = Annotated[
    Patient | Observation | MedicationAdministration | AdverseEvent | OperationOutcome | AuditEvent,
    Field(discriminator="resource_type"),
]


class Bundle(Resource):
    """Search results (searchset), history, and transaction/batch requests and responses."""

    resource_type: Literal["Bundle"]
    identifier: Identifier | None = None
    type: BundleType
    timestamp: Instant | None = None
    total: UnsignedInt | None = None
    link: Repeated[BundleLink] | None = None
    entry: Repeated[BundleEntry] | None = None
    signature: Signature | None = None


# CapabilityStatement: the server writes it and clients only read it. It documents the main
# elements only (R4B defines about a hundred, most of them irrelevant here), so it is open
# (extra="allow"): a generated client keeps any other element in additional_properties
# instead of dropping it.
_OPEN = ConfigDict(extra="allow")


class CapabilityStatementSoftware(BackboneElement):
    model_config = _OPEN

    name: String
    version: String | None = None
    release_date: DateTime | None = None


class CapabilityStatementImplementation(BackboneElement):
    model_config = _OPEN

    description: String
    url: Url | None = None


class CapabilityStatementRestSecurity(BackboneElement):
    model_config = _OPEN

    cors: Boolean | None = None
    service: Repeated[CodeableConcept] | None = None
    description: Markdown | None = None


class CapabilityStatementRestResourceInteraction(BackboneElement):
    model_config = _OPEN

    code: TypeRestfulInteraction
    documentation: Markdown | None = None


class CapabilityStatementRestResourceSearchParam(BackboneElement):
    model_config = _OPEN

    name: String
    definition: Canonical | None = None
    type: SearchParamType
    documentation: Markdown | None = None


class CapabilityStatementRestResourceOperation(BackboneElement):
    model_config = _OPEN

    name: String
    definition: Canonical
    documentation: Markdown | None = None


class CapabilityStatementRestResource(BackboneElement):
    model_config = _OPEN

    type: Code
    profile: Canonical | None = None
    supported_profile: Repeated[Canonical] | None = None
    documentation: Markdown | None = None
    interaction: Repeated[CapabilityStatementRestResourceInteraction] | None = None
    versioning: ResourceVersionPolicy | None = None
    read_history: Boolean | None = None
    update_create: Boolean | None = None
    conditional_create: Boolean | None = None
    conditional_read: ConditionalReadStatus | None = None
    conditional_update: Boolean | None = None
    conditional_delete: ConditionalDeleteStatus | None = None
    reference_policy: Repeated[ReferenceHandlingPolicy] | None = None
    search_include: Repeated[String] | None = None
    search_rev_include: Repeated[String] | None = None
    search_param: Repeated[CapabilityStatementRestResourceSearchParam] | None = None
    operation: Repeated[CapabilityStatementRestResourceOperation] | None = None


class CapabilityStatementRestInteraction(BackboneElement):
    model_config = _OPEN

    code: SystemRestfulInteraction
    documentation: Markdown | None = None


class CapabilityStatementRest(BackboneElement):
    model_config = _OPEN

    mode: RestfulCapabilityMode
    documentation: Markdown | None = None
    security: CapabilityStatementRestSecurity | None = None
    resource: Repeated[CapabilityStatementRestResource] | None = None
    interaction: Repeated[CapabilityStatementRestInteraction] | None = None
    search_param: Repeated[CapabilityStatementRestResourceSearchParam] | None = None
    operation: Repeated[CapabilityStatementRestResourceOperation] | None = None
    compartment: Repeated[Canonical] | None = None


class CapabilityStatement(DomainResource):
    """What this server supports (GET /fhir/metadata), and where it differs from others."""

    model_config = _OPEN

    resource_type: Literal["CapabilityStatement"]
    url: Uri | None = None
    version: String | None = None
    name: String | None = None
    title: String | None = None
    status: PublicationStatus
    experimental: Boolean | None = None
    date: DateTime
    publisher: String | None = None
    description: Markdown | None = None
    kind: CapabilityStatementKind
    instantiates: Repeated[Canonical] | None = None
    software: CapabilityStatementSoftware | None = None
    implementation: CapabilityStatementImplementation | None = None
    fhir_version: Code = Field(description="4.3.0")
    format: Repeated[Code]
    patch_format: Repeated[Code] | None = None
    implementation_guide: Repeated[Canonical] | None = None
    rest: Repeated[CapabilityStatementRest] | None = None


# The clinical resources the API creates, reads, updates and searches, by resourceType.
RESOURCE_MODELS: dict[str, type[BaseModel]] = {
    model.__name__: model
    for model in (Patient, Observation, MedicationAdministration, AdverseEvent)
}

# The models refer to one another before they are defined, so each is built once here
# (defer_build), when all exist: a mistake fails at import, not in a route. Extension first:
# it reaches every datatype, and the others then reuse its schemas (four times faster).
for _model in [Extension, *globals().values()]:
    if isinstance(_model, type) and issubclass(_model, FhirModel):
        _model.model_rebuild()
