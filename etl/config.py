"""Typed clinic configuration (one YAML file per clinic) and secret resolution.

The YAML keys are the contract of issue #2 and SPEC section 4 (defaults in brackets there).
Validation happens once, at load, and errors name the key path (``rules.value_window_days``),
never a value, because a misplaced secret or address in YAML must not end up in a log line.
Secrets never live in YAML: the opaque-ID key comes from ``MEDSPA_ID_SECRET``.
"""

from __future__ import annotations

import functools
import os
import re
import zoneinfo
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from etl.errors import ConfigError

ID_SECRET_ENV = "MEDSPA_ID_SECRET"
# Used only for dry runs without a configured secret; the CLI labels every such run loudly and
# a real send refuses it (see ``resolve_id_secret``).
DEVELOPMENT_ID_SECRET = "medspa-conversions-DEVELOPMENT-KEY-not-for-real-sends"

ProfileName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
DATABASE_URL_ENV = "MEDSPA_DATABASE_URL"  # the staging database, when the YAML names none
_GENERIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,49}$")
# Event names reach Meta verbatim, so SPEC section 2's "never a service, treatment, condition,
# provider or location name" is enforced by building them from these words only (an allowlist:
# no list of treatments could be complete). Meta's standard events, then generic funnel words;
# health words (patient, treatment, procedure, clinic) are left out on purpose.
# fmt: off
GENERIC_EVENT_WORDS = frozenset([
    # Meta's standard events
    "add", "application", "cart", "checkout", "complete", "content", "contact", "customize", "donate",
    "find", "info", "initiate", "lead", "location", "payment", "product", "purchase", "registration",
    "schedule", "search", "start", "submit", "subscribe", "to", "trial", "view", "wishlist",
    # generic funnel words
    "appointment", "appt", "arrived", "attend", "attended", "book", "booked", "booking", "checked",
    "client", "closed", "consult", "consultation", "converted", "conversion", "customer", "deposit",
    "event", "existing", "first", "follow", "high", "in", "initial", "invoice", "low", "member",
    "membership", "new", "offline", "order", "out", "package", "paid", "qualified",
    "repeat", "returning", "revenue", "sale", "sales", "second", "show", "showed", "signed", "stage",
    "store", "third", "transaction", "up", "value", "visit", "visited", "won",
])
# fmt: on
_NAME_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_VERSION = re.compile(r"_?[Vv][0-9]+$")


def non_generic_words(name: str) -> list[str]:
    """The words of a CamelCase or snake_case ``name`` not in ``GENERIC_EVENT_WORDS``. Numbers
    name nothing; a single letter does not pass (``B_O_T_O_X`` spells a word), save the ``V``
    of a trailing version (``ConsultationAttendedV2``)."""
    words = _NAME_WORDS.findall(_VERSION.sub("", name))
    return [w for w in words if not w.isdigit() and w.lower() not in GENERIC_EVENT_WORDS]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """``consultation_value: yes`` is a slip, not 1.0: pydantic's lax mode reads YAML's
        true/false (yes/no, on/off) as 1/0, which would send $1 values or a one-day window."""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            kinds = set(get_args(annotation)) or {annotation}
            if kinds & {int, float} and bool not in kinds:
                raise ValueError("expected a number, not true/false (yes/no, on/off)")
        return value


class SourceConfig(_Model):
    """Where one export comes from: a CSV file, or a SQL query against a database."""

    path: Path | None = Field(None, description="CSV export; relative to the YAML file's folder.")
    profile: ProfileName = Field("generic", description="Column/status mapping: generic, zenoti, mindbody.")
    encoding: str | None = Field(None, description="Force a text encoding; default: UTF-8, then cp1252.")
    sql_url: str | None = Field(None, description="SQLAlchemy URL of the source database (no password).")
    sql_url_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of an environment variable holding the source database's URL (for one with a password).",
    )
    query: Path | None = Field(
        None, description="SQL file (bound parameters :clinic_id, :start, :end); relative to YAML."
    )
    complete: bool = Field(
        False,
        description="Each export holds every record of the clinic: a staged record missing from it "
        "was deleted at the source and is deleted from staging (so its person leaves the lists).",
    )
    max_deleted_share: float = Field(
        0.2,
        ge=0,
        le=1,
        description="A complete export that would delete more than this share of the staged records "
        "is refused, nothing of it kept (a truncated file would otherwise empty the lists).",
    )

    @field_validator("query", "path")
    @classmethod
    def _not_empty(cls, value: Path | None) -> Path | None:
        if value is not None and not str(value).strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("sql_url")
    @classmethod
    def _no_password(cls, value: str | None) -> str | None:
        if value is not None and _has_password(value):
            raise ValueError(
                "holds a password; keep secrets out of the YAML: put the URL in an environment "
                "variable and name that variable in 'sql_url_env'"
            )
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> SourceConfig:
        kinds = [k for k in (self.path, self.sql_url, self.sql_url_env) if k is not None]
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one of 'path' (CSV), or 'sql_url' or 'sql_url_env' with 'query' (SQL)"
            )
        if self.path is None and self.query is None:
            raise ValueError("a SQL source needs 'query' (a .sql file)")
        return self

    def source_url(self) -> str:
        """The SQL source's URL: ``sql_url``, or the environment variable ``sql_url_env`` names."""
        if self.sql_url is not None:
            return self.sql_url
        url = os.environ.get(self.sql_url_env or "", "").strip()
        if not url:
            raise ConfigError(f"sql_url_env: environment variable {self.sql_url_env} is not set")
        return url


# query parameters a driver takes as the password (psycopg2/libpq, the MySQL drivers, ODBC)
PASSWORD_PARAMETERS = frozenset({"password", "passwd", "pwd"})


def _has_password(url: str) -> bool:
    """Whether a URL carries a password: in its ``user:password@`` part or as a query parameter
    (``?password=``, which psycopg2 and the MySQL drivers honour as well)."""
    from urllib.parse import parse_qsl, unquote

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    _, mark, query = url.partition("?")
    # judged from the text as well: make_url drops a parameter it cannot read, and the URL may be
    # no URL SQLAlchemy parses at all (reported where it is used)
    keys = {unquote(key).strip().lower() for key, _ in parse_qsl(query, keep_blank_values=True)}
    if mark and keys & PASSWORD_PARAMETERS:
        return True
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        # it may still carry a password in its user part (a typo in the port)
        return re.match(r"^[^:/@]+://[^/@:]*:[^@]*@", url) is not None
    return bool(parsed.password) or any(key.lower() in PASSWORD_PARAMETERS for key in parsed.query)


class Sources(_Model):
    appointments: SourceConfig
    leads: SourceConfig


class Rules(_Model):
    """SPEC section 4 knobs; every window is in days."""

    attribution_window_days: int = Field(90, ge=1, le=3650)
    value_window_days: int = Field(30, ge=0, le=3650)
    existing_patient_lookback_days: int = Field(365, ge=0, le=3650)
    late_arrival_days: int = Field(7, ge=0, le=365)
    suppression_lookback_days: int = Field(365, ge=1, le=3650)
    suppression_requires_consent: bool = True
    consultation_value: float | None = Field(None, ge=0, allow_inf_nan=False)


class Exclude(_Model):
    email_domains: list[str] = Field(default_factory=lambda: ["example.com", "test.com"])
    name_patterns: list[str] = Field(default_factory=lambda: ["^test$", "^do not use$"])

    @field_validator("name_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {i} is not a valid regular expression ({exc.msg})") from None
        return patterns


class Retention(_Model):
    """How long a run's working files stay in its folder (``medspa-conversions prune``)."""

    run_files_days: int | None = Field(
        None,
        ge=1,
        description=(
            "Days after a run folder's last change that its outbox rows (hashed identifiers), "
            "leftover hashed extracts and candidate file are deleted, the summary, results and "
            "report kept; pruned by every run's report step. Default: kept until pruned by hand."
        ),
    )


class Quality(_Model):
    """Where a data-quality share or ratio becomes a finding (docs/quality.md). The defaults are
    what the committed suites under ``expectations/`` hold; a clinic whose exports differ (a CRM
    that rarely captures phones, say) sets its own."""

    max_unusable_email_share: float = Field(0.5, ge=0, le=1, description="Warning above this share.")
    max_unusable_phone_share: float = Field(0.5, ge=0, le=1, description="Warning above this share.")
    max_unknown_status_share: float = Field(
        0.2, ge=0, le=1, description="Critical above: a shifted column or a new status vocabulary."
    )
    max_no_lead_share: float = Field(
        0.9, ge=0, le=1, description="Warning above: attended visits in the window with no lead."
    )
    volume_factor: float = Field(
        3.0, gt=1, description="Warning when a day's appointments are this many times off the median."
    )
    volume_min_median: float = Field(
        20.0, ge=0, description="Days with a lower trailing median are not judged."
    )
    volume_trailing_days: int = Field(28, ge=7, le=365)
    max_abs_revenue: float = Field(
        100_000.0, gt=0, description="Critical beyond: an ID, phone or ZIP shifted into revenue."
    )


class ConversionActions(_Model):
    consultation: str = Field(pattern=r"^customers/\d+/conversionActions/\d+$")
    purchase: str = Field(pattern=r"^customers/\d+/conversionActions/\d+$")


class GoogleAds(_Model):
    customer_id: str = Field(pattern=r"^\d{10}$")
    conversion_actions: ConversionActions
    suppression_user_list: str | None = Field(None, pattern=r"^customers/\d+/userLists/\d+$")
    enhanced_conversions_for_leads: bool = True
    click_window_days: int = Field(90, ge=1, le=90)
    api: Literal["data_manager", "google_ads"] = "data_manager"
    suppression_enabled: bool = Field(
        True,
        description="Send Customer Match exclusion lists; Google's personalized-ads policy counts "
        "exclusion as targeting, so a clinic may have to turn this off.",
    )
    login_customer_id: str | None = Field(None, pattern=r"^\d{10}$")

    @model_validator(mode="after")
    def _data_manager_sends_to_the_owner(self) -> GoogleAds:
        """The Data Manager API sends to ``customer_id`` as the operating account, which must be
        the account owning the conversion actions and the list (ad-platforms.md A5: not a
        manager's, as the Google Ads API allows); another account there would go unnoticed in
        the sandbox and be refused, or land elsewhere, live."""
        if self.api != "data_manager":
            return self
        named = {
            "conversion_actions.consultation": self.conversion_actions.consultation,
            "conversion_actions.purchase": self.conversion_actions.purchase,
            "suppression_user_list": self.suppression_user_list,
        }
        for key, resource in named.items():
            if resource is not None and (owner := resource.split("/")[1]) != self.customer_id:
                raise ValueError(
                    f"{key} belongs to customer {owner}, not customer_id {self.customer_id}: the Data "
                    "Manager API sends to customer_id, which must own it (api: google_ads can send "
                    "through a manager account)"
                )
        return self


class EventNames(_Model):
    consultation: str = "ConsultationAttended"
    purchase: str = "Purchase"

    @field_validator("consultation", "purchase")
    @classmethod
    def _generic(cls, name: str) -> str:
        if not _GENERIC_NAME.match(name):
            raise ValueError("must be a generic name: letters, digits and '_' (no spaces)")
        if odd := non_generic_words(name):
            raise ValueError(
                f"{', '.join(repr(w) for w in odd)} is not a generic word: Meta receives event names as they "
                "are, so they are built from generic words only (e.g. ConsultationAttended, Purchase, "
                "Lead, Schedule, FirstVisit; the list is etl.config.GENERIC_EVENT_WORDS), never a "
                "service, treatment, condition, provider or location name"
            )
        return name


class Meta(_Model):
    pixel_id: str = Field(pattern=r"^\d{5,20}$")
    suppression_audience_id: str | None = Field(None, pattern=r"^\d{5,20}$")
    event_names: EventNames = Field(default_factory=EventNames)
    action_source: Literal[
        "physical_store",
        "system_generated",
        "phone_call",
        "email",
        "chat",
        "other",
    ] = "physical_store"
    max_event_age_days: int | None = Field(
        None, ge=1, le=62, description="Default: 62 for physical_store, 7 otherwise (Meta's limits)."
    )
    limited_data_use: bool = Field(False, description="Send Meta's Limited Data Use flag with events.")
    ldu_country: Literal[0, 1] = Field(
        1, description="data_processing_options_country (1 = US, 0 = geolocate)."
    )
    ldu_state: Literal[0, 1000] = Field(
        1000, description="data_processing_options_state (1000 = California, 0 = geolocate)."
    )
    suppression_enabled: bool = True

    @field_validator("action_source", mode="before")
    @classmethod
    def _sendable_source(cls, value: Any) -> Any:
        if value in ("website", "app"):
            # Meta requires event_source_url + client IP + user agent (website) or app data
            # (app) for these; the PHI allowlist forbids sending any of them (SPEC section 2)
            raise ValueError(
                f"'{value}' events need fields this tool never sends (page URL, IP, user agent or "
                "app data); use physical_store for in-clinic visits"
            )
        return value

    @model_validator(mode="after")
    def _age_within_meta_limit(self) -> Meta:
        if self.action_source != "physical_store" and (self.max_event_age_days or 0) > 7:
            raise ValueError(
                f"max_event_age_days: Meta takes {self.action_source} events up to 7 days old "
                "(62 only for physical_store)"
            )
        return self

    @property
    def event_age_limit_days(self) -> int:
        if self.max_event_age_days is not None:
            return self.max_event_age_days
        return 62 if self.action_source == "physical_store" else 7


class LegalBasis(_Model):
    """One platform's entry in the clinic's legal-basis registry: what a live send to it rests on,
    and until when that was reviewed. Google and Meta sign no business associate agreement for
    advertising, so the one basis this tool sends under is each patient's marketing authorization
    (SPEC rule 6); the entry records that someone at the clinic confirmed it, and expires."""

    basis: str = Field(description="marketing_authorization: each patient's HIPAA marketing authorization.")
    baa: bool = Field(description="false: the platform signed no business associate agreement.")
    valid_until: date = Field(
        description="Last clinic-local day this review covers; from the day after, live sends are refused."
    )

    @field_validator("basis")
    @classmethod
    def _authorization(cls, value: str) -> str:
        if value != "marketing_authorization":
            raise ValueError(
                "must be marketing_authorization: an ad platform receives hashed identifiers under "
                "each patient's marketing authorization (SPEC rule 6), the only basis this tool "
                "sends under"
            )
        return value

    @field_validator("baa")
    @classmethod
    def _no_baa(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "must be false: Google and Meta sign no business associate agreement for "
                "advertising, so nothing may rest on one"
            )
        return value


class LegalBases(_Model):
    google_ads: LegalBasis | None = None
    meta: LegalBasis | None = None


class Compliance(_Model):
    """The regime the clinic declares, so an auditor sees which one each run assumed, and the
    registry a live send checks first: a platform without an entry, or whose entry expired, is
    not sent to (dry and sandbox runs only record the registry in their summary)."""

    hipaa_status: Literal["covered_entity", "not_covered_entity", "undetermined"] = Field(
        "undetermined",
        description="Whether the clinic is a HIPAA covered entity, as its counsel decided; "
        "the pipeline treats all clinic data as PHI either way.",
    )
    legal_basis: LegalBases = Field(default_factory=LegalBases)


# the config sections of the platforms, and the destinations each one sends to
# a registry entry this close to its last day is flagged (doctor, each live send's log), so its
# review happens before live sends stop, not after
LEGAL_BASIS_NOTICE_DAYS = 30

PLATFORM_DESTINATIONS = {
    "google_ads": ("google_conversions", "google_customer_match"),
    "meta": ("meta_events", "meta_audience"),
}


_NOT_CLINIC_ZONES = frozenset({"Factory", "localtime", "posixrules"})


@functools.cache
def _iana_zones() -> frozenset[str]:
    """The zone names ``zoneinfo`` lists (without the posix/ and right/ copies of each)."""
    return frozenset(zoneinfo.available_timezones())


class ClinicConfig(_Model):
    clinic_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    timezone: str
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$")
    default_region: str = Field("US", pattern=r"^[A-Z]{2}$")
    database_url: str | None = Field(
        None, description="Staging database URL without a password (else MEDSPA_DATABASE_URL or --database)."
    )
    schedule: str = Field(
        "0 3 * * *",
        pattern=r"^\S+( \S+){4}$",
        description="Cron (5 fields) of the nightly Airflow run, in the clinic's time zone.",
    )
    sources: Sources
    rules: Rules = Field(default_factory=Rules)
    exclude: Exclude = Field(default_factory=Exclude)
    quality: Quality = Field(default_factory=Quality)
    retention: Retention = Field(default_factory=Retention)
    compliance: Compliance = Field(default_factory=Compliance)
    google_ads: GoogleAds | None = None
    meta: Meta | None = None
    # Folder of the YAML file; relative paths in the file resolve against it.
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        # zoneinfo also opens any file under its folders: the posix/ and right/ copies (right/
        # counts leap seconds), localtime (whatever the host's zone is) and Factory (no zone at
        # all); pytz, PostgreSQL or Airflow may not know them, so only the zones it lists count
        if name in _NOT_CLINIC_ZONES or name not in _iana_zones():
            raise ValueError(
                "not an IANA time zone name (e.g. America/Los_Angeles; "
                "not a posix/ or right/ copy, localtime or Factory)"
            )
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):  # listed, but its file is unreadable
            raise ValueError("not an IANA time zone name (e.g. America/Los_Angeles)") from None
        return name

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, code: str) -> str:
        from etl.identifier_tables import ISO_4217  # the gate's list: it would refuse every row

        if code not in ISO_4217:
            raise ValueError("not an ISO 4217 currency code (e.g. USD)")
        return code

    @field_validator("default_region")
    @classmethod
    def _known_region(cls, code: str) -> str:
        from etl.identifier_tables import ALPHA2

        if code not in ALPHA2:
            raise ValueError("not an ISO 3166-1 alpha-2 country code (e.g. US)")
        return code

    @property
    def tz(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path)

    def mirrors_a_list(self, platform: str) -> bool:
        """Whether a sync mirrors a suppression list on ``platform`` (``google_ads``/``meta``)."""
        if platform == "google_ads":
            return (
                self.google_ads is not None
                and bool(self.google_ads.suppression_user_list)
                and self.google_ads.suppression_enabled
            )
        return (
            self.meta is not None
            and bool(self.meta.suppression_audience_id)
            and self.meta.suppression_enabled
        )

    def legal_basis_problem(self, platform: str, today: date) -> str | None:
        """Why a live send to ``platform`` (``google_ads`` or ``meta``) is refused on the
        clinic-local day ``today``, or None when its registry entry covers that day."""
        entry: LegalBasis | None = getattr(self.compliance.legal_basis, platform)
        key = f"compliance.legal_basis.{platform}"
        if entry is None:
            return f"missing {key} (a live send needs the clinic's legal basis on record)"
        if today > entry.valid_until:
            return f"{key} expired after {entry.valid_until.isoformat()} (review it, then move valid_until)"
        return None

    def legal_basis_days_left(self, platform: str, today: date) -> int | None:
        """Days the platform's registry entry still covers after ``today`` when that is at most
        ``LEGAL_BASIS_NOTICE_DAYS`` (its review is due), else None (no entry, expired, or not due)."""
        entry: LegalBasis | None = getattr(self.compliance.legal_basis, platform)
        if entry is None or today > entry.valid_until:
            return None
        left = (entry.valid_until - today).days
        return left if left <= LEGAL_BASIS_NOTICE_DAYS else None

    def legal_basis_record(self) -> dict[str, Any]:
        """The registry as a run's summary keeps it: the declared regime, and per configured
        platform its basis and review date (None: no entry). Config facts, never data."""
        record: dict[str, Any] = {"hipaa_status": self.compliance.hipaa_status}
        for platform in PLATFORM_DESTINATIONS:
            if getattr(self, platform) is None:
                continue
            entry: LegalBasis | None = getattr(self.compliance.legal_basis, platform)
            record[platform] = (
                None
                if entry is None
                else {"basis": entry.basis, "baa": entry.baa, "valid_until": entry.valid_until.isoformat()}
            )
        return record

    @field_validator("database_url")
    @classmethod
    def _database_url_without_password(cls, value: str | None) -> str | None:
        if value is not None and _has_password(value):
            raise ValueError(
                f"holds a password; keep secrets out of the YAML: set {DATABASE_URL_ENV} in the "
                "environment (or pass --database) instead"
            )
        return value

    def resolved_database_url(self, override: str | None = None) -> str:
        """The staging database: ``--database`` wins, then YAML, then the environment variable
        ``MEDSPA_DATABASE_URL`` (where a URL with a password belongs), then a SQLite file beside
        the YAML.

        A relative SQLite path in YAML resolves against the YAML's folder like every other path.
        """
        url = override or self.database_url or os.environ.get(DATABASE_URL_ENV, "").strip() or None
        if url is None:
            return f"sqlite:///{self.base_dir / 'var' / (self.clinic_id + '.sqlite')}"
        return self.resolve_url(url)

    def resolve_url(self, url: str) -> str:
        """A SQLAlchemy URL with a relative SQLite file path anchored at the YAML's folder (the
        staging database's and a SQL source's alike), not at whatever folder the run starts in."""
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError):
            return url  # reported where it is used
        database = parsed.database or ""
        # in memory, an absolute path, or a URI filename (file:...?mode=ro&uri=true): as given
        if (
            parsed.get_backend_name() != "sqlite"
            or database in ("", ":memory:")
            or database.startswith("file:")
        ):
            return url
        if Path(database).is_absolute():
            return url
        return parsed.set(database=str(self.base_dir / database)).render_as_string(hide_password=False)


_KEY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _key_name(key: str) -> str:
    """A key as an error may show it: a name, or a placeholder when the key is no name (a
    misplaced value, an address or a secret pasted where a key belongs, is not repeated)."""
    return key if _KEY_NAME.fullmatch(key) else "<unnamed key>"


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            # a list position; a large number is a mapping's key (phone digits pasted as one)
            parts.append(f"[{item}]" if 0 <= item < 1000 else "[<unnamed key>]")
        else:
            parts.append(("." if parts else "") + _key_name(item))
    return "".join(parts) or "(top level)"


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, line: int) -> None:
        super().__init__(key)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's own loaders let a repeated key replace the first silently: a second ``rules:``
    block appended at the bottom would reset every rule the first one set to its default."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # the mapping's own plain keys only: a merge (<<: *anchor) may repeat a key on purpose
        seen: set[str] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str):
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path) -> ClinicConfig:
    """Load and validate one clinic YAML.

    Raises:
        ConfigError: naming the file and every offending key path with the reason; values are
            never echoed (a YAML may carry an address or a misplaced secret).
    """
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:  # a folder, a file it may not read, not text
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"{path}: cannot read the config file ({reason})") from None
    except _DuplicateKey as exc:
        raise ConfigError(
            f"{path}: the key '{_key_name(exc.key)}' appears twice in one mapping (line {exc.line})"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    try:
        return ClinicConfig.model_validate({**raw, "base_dir": path.resolve().parent})
    except ValidationError as exc:
        problems = [f"{_key_path(err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError(f"{path}: invalid config\n  " + "\n  ".join(problems)) from None


def resolve_id_secret(*, real_send: bool, environ: dict[str, str] | None = None) -> tuple[bytes, bool]:
    """Return the HMAC key for opaque IDs and whether it is the development key.

    Raises:
        ConfigError: on a real send without ``MEDSPA_ID_SECRET``, because IDs made with the
            public development key would be guessable by anyone holding the source code.
    """
    env = os.environ if environ is None else environ
    secret = env.get(ID_SECRET_ENV, "")
    if secret:
        if len(secret) < 16:
            raise ConfigError(f"{ID_SECRET_ENV} is too short: use at least 16 characters")
        return secret.encode("utf-8"), False
    if real_send:
        raise ConfigError(
            f"{ID_SECRET_ENV} is not set: a real send refuses the development key. "
            "Set it to a long random value kept outside the repository."
        )
    return DEVELOPMENT_ID_SECRET.encode("utf-8"), True
