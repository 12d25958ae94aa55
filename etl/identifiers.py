"""Normalize and SHA-256-hash contact identifiers the way Google Ads and Meta each specify.

The contract is SPEC rule 9 (``shared/SPEC.md``) with the platform facts and published test
vectors of ``shared/reference/ad-platforms.md`` sections A3 (Google) and B2 (Meta); the output
columns of :func:`hash_identifiers` are listed in ``docs/architecture.md`` ("Identifier columns").

Scalar normalizers are pure and total: they take any object (``None``, ``NaN``, ``pd.NA``, numbers,
text) and return the normalized string or ``None`` when the value is unusable; they never raise.
Whole numbers up to 15 digits are read as their digits (a ZIP or phone column that a CSV reader
typed as a number); other non-text values are unusable. Text is NFC-composed before names, cities and states are normalized, so a decomposed ``é`` from
one system and a composed one from another hash alike.

Decisions where the sources leave room (see ad-platforms.md C and D):

- Google names: trim, lowercase, runs of inner whitespace collapsed to one space (Google's own
  ``Formatter`` only trims and lowercases; collapsing only merges typing accidents). Prefixes and
  suffixes (``Mrs.``, ``Jr.``) are not stripped: SPEC rule 9 asks for trim + lowercase only.
- Meta names: lowercase, letters only, so punctuation *and inner spaces* go (``Mary Ann`` ->
  ``maryann``). Meta's rule is "lowercase, no punctuation"; its Pixel removes inner spaces while
  its GTM CAPI template did not (facebookincubator/ConversionsAPI-Tag-for-GoogleTagManager#24),
  so we match the Pixel, Meta's own first-party normalizer (and the same rule as ``ct``).
- A name, city or state without a single letter is unusable (a ``.`` or ``-`` placeholder).
- Countries: ISO 3166-1 alpha-2 or alpha-3 codes (full table below), ``UK`` for ``GB``, and a
  small table of common English names; anything else is unusable. ZIP rules for the US also
  apply to the territories that use US ZIP codes.

Nothing here logs, and no value ever reaches an exception message (SPEC section 2).
"""

from __future__ import annotations

import hashlib
import numbers
import re
import unicodedata
from collections.abc import Callable, Iterable
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt
import pandas as pd
import phonenumbers

RAW_COLUMNS: Final = (
    "email", "phone", "first_name", "last_name", "city", "state", "zip", "country",
)  # fmt: skip
HASHED_COLUMNS: Final = (
    "em_g", "em_m", "ph_g", "ph_m", "fn_g", "ln_g", "fn_m", "ln_m",
    "ct_m", "st_m", "zp_m", "country_m",
)  # fmt: skip
CLEAR_COLUMNS: Final = ("postal_code", "country_code")

_GMAIL_DOMAINS: Final = frozenset({"gmail.com", "googlemail.com"})
_WHITESPACE = re.compile(r"\s")
_NOT_ASCII_LETTER = re.compile(r"[^a-z]")
# phonenumbers reads digits mixed with these (and one leading +) exactly as it reads the bare
# digits, so those digits are a safe cache key; longer inputs than 250 it refuses
_PHONE_PUNCTUATION: Final = str.maketrans("", "", " ().-")
_PHONE_MAX_INPUT: Final = 250
_NANP_REGIONS: Final = frozenset(phonenumbers.COUNTRY_CODE_TO_REGION_CODE[1])
_NANP_MAIN_REGION: Final = phonenumbers.region_code_for_country_code(1)
_US_ZIP = re.compile(r"([0-9]{5})(?:[ \-]?[0-9]{4})?")
_POSTAL = re.compile(r"[a-z0-9]{2,10}")
_US_ZIP_REGIONS: Final = frozenset({"US", "PR", "VI", "GU", "AS", "MP"})
_MAX_NUMBER: Final = 10**15  # a number cell longer than any E.164 number is not an identifier

# ISO 3166-1 alpha-3 followed by alpha-2, all 249 officially assigned codes
_ISO_3166: Final = """
ABWAW AFGAF AGOAO AIAAI ALAAX ALBAL ANDAD AREAE ARGAR ARMAM ASMAS ATAAQ ATFTF ATGAG AUSAU
AUTAT AZEAZ BDIBI BELBE BENBJ BESBQ BFABF BGDBD BGRBG BHRBH BHSBS BIHBA BLMBL BLRBY BLZBZ
BMUBM BOLBO BRABR BRBBB BRNBN BTNBT BVTBV BWABW CAFCF CANCA CCKCC CHECH CHLCL CHNCN CIVCI
CMRCM CODCD COGCG COKCK COLCO COMKM CPVCV CRICR CUBCU CUWCW CXRCX CYMKY CYPCY CZECZ DEUDE
DJIDJ DMADM DNKDK DOMDO DZADZ ECUEC EGYEG ERIER ESHEH ESPES ESTEE ETHET FINFI FJIFJ FLKFK
FRAFR FROFO FSMFM GABGA GBRGB GEOGE GGYGG GHAGH GIBGI GINGN GLPGP GMBGM GNBGW GNQGQ GRCGR
GRDGD GRLGL GTMGT GUFGF GUMGU GUYGY HKGHK HMDHM HNDHN HRVHR HTIHT HUNHU IDNID IMNIM INDIN
IOTIO IRLIE IRNIR IRQIQ ISLIS ISRIL ITAIT JAMJM JEYJE JORJO JPNJP KAZKZ KENKE KGZKG KHMKH
KIRKI KNAKN KORKR KWTKW LAOLA LBNLB LBRLR LBYLY LCALC LIELI LKALK LSOLS LTULT LUXLU LVALV
MACMO MAFMF MARMA MCOMC MDAMD MDGMG MDVMV MEXMX MHLMH MKDMK MLIML MLTMT MMRMM MNEME MNGMN
MNPMP MOZMZ MRTMR MSRMS MTQMQ MUSMU MWIMW MYSMY MYTYT NAMNA NCLNC NERNE NFKNF NGANG NICNI
NIUNU NLDNL NORNO NPLNP NRUNR NZLNZ OMNOM PAKPK PANPA PCNPN PERPE PHLPH PLWPW PNGPG POLPL
PRIPR PRKKP PRTPT PRYPY PSEPS PYFPF QATQA REURE ROURO RUSRU RWARW SAUSA SDNSD SENSN SGPSG
SGSGS SHNSH SJMSJ SLBSB SLESL SLVSV SMRSM SOMSO SPMPM SRBRS SSDSS STPST SURSR SVKSK SVNSI
SWESE SWZSZ SXMSX SYCSC SYRSY TCATC TCDTD TGOTG THATH TJKTJ TKLTK TKMTM TLSTL TONTO TTOTT
TUNTN TURTR TUVTV TWNTW TZATZ UGAUG UKRUA UMIUM URYUY USAUS UZBUZ VATVA VCTVC VENVE VGBVG
VIRVI VNMVN VUTVU WLFWF WSMWS YEMYE ZAFZA ZMBZM ZWEZW
"""
_ALPHA3_TO_ALPHA2: Final = {pair[:3]: pair[3:] for pair in _ISO_3166.split()}
_ALPHA2: Final = frozenset(_ALPHA3_TO_ALPHA2.values())
# keys are lowercase letters only, as _letters() leaves them ("U.S." -> "us")
_COUNTRY_NAMES: Final = {
    "uk": "GB", "unitedstates": "US", "unitedstatesofamerica": "US", "america": "US",
    "canada": "CA", "mexico": "MX", "unitedkingdom": "GB", "greatbritain": "GB", "britain": "GB",
    "england": "GB", "scotland": "GB", "wales": "GB", "northernireland": "GB", "ireland": "IE",
    "australia": "AU", "newzealand": "NZ", "puertorico": "PR", "germany": "DE", "france": "FR",
    "spain": "ES", "italy": "IT", "netherlands": "NL", "holland": "NL", "belgium": "BE",
    "switzerland": "CH", "austria": "AT", "portugal": "PT", "sweden": "SE", "norway": "NO",
    "denmark": "DK", "finland": "FI", "poland": "PL", "greece": "GR", "brazil": "BR",
    "argentina": "AR", "colombia": "CO", "chile": "CL", "india": "IN", "china": "CN",
    "japan": "JP", "southkorea": "KR", "korea": "KR", "singapore": "SG", "philippines": "PH",
    "israel": "IL", "southafrica": "ZA", "unitedarabemirates": "AE", "uae": "AE",
}  # fmt: skip
_US_STATES: Final = {
    "alabama": "al", "alaska": "ak", "arizona": "az", "arkansas": "ar", "california": "ca",
    "colorado": "co", "connecticut": "ct", "delaware": "de", "districtofcolumbia": "dc",
    "florida": "fl", "georgia": "ga", "hawaii": "hi", "idaho": "id", "illinois": "il",
    "indiana": "in", "iowa": "ia", "kansas": "ks", "kentucky": "ky", "louisiana": "la",
    "maine": "me", "maryland": "md", "massachusetts": "ma", "michigan": "mi", "minnesota": "mn",
    "mississippi": "ms", "missouri": "mo", "montana": "mt", "nebraska": "ne", "nevada": "nv",
    "newhampshire": "nh", "newjersey": "nj", "newmexico": "nm", "newyork": "ny",
    "northcarolina": "nc", "northdakota": "nd", "ohio": "oh", "oklahoma": "ok", "oregon": "or",
    "pennsylvania": "pa", "rhodeisland": "ri", "southcarolina": "sc", "southdakota": "sd",
    "tennessee": "tn", "texas": "tx", "utah": "ut", "vermont": "vt", "virginia": "va",
    "washington": "wa", "westvirginia": "wv", "wisconsin": "wi", "wyoming": "wy",
    "puertorico": "pr", "virginislands": "vi", "usvirginislands": "vi", "guam": "gu",
    "americansamoa": "as", "northernmarianaislands": "mp", "armedforcesamericas": "aa",
    "armedforceseurope": "ae", "armedforcespacific": "ap",
}  # fmt: skip
_US_STATE_CODES: Final = frozenset(_US_STATES.values())


def sha256_hex(text: str) -> str:
    """Return the lowercase hex SHA-256 of ``text`` encoded as UTF-8 (both platforms' hash)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def normalize_and_hash(value: object, normalize: Callable[[object], str | None]) -> str | None:
    """Normalize ``value`` with ``normalize`` and hash the result.

    Args:
        value: any raw cell.
        normalize: one of this module's normalizers; bind extra arguments first, e.g.
            ``functools.partial(normalize_phone_e164, region="US")``.

    Returns:
        64 lowercase hex characters, or ``None`` when the value is unusable.
    """
    normalized = normalize(value)
    return None if normalized is None else sha256_hex(normalized)


def normalize_email_meta(value: object) -> str | None:
    """Meta form of an email: trimmed and lowercased, no Gmail rule (B2).

    Returns:
        ``local@domain``, or ``None`` unless there is exactly one ``@``, a non-empty local part, a
        domain with a dot not at either end, and no whitespace inside.
    """
    text = _as_text(value)
    if text is None:
        return None
    email = text.strip().lower()
    if _WHITESPACE.search(email):
        return None
    local, at, domain = email.partition("@")
    if not at or not local or "@" in domain or "." not in domain:
        return None
    if domain.startswith(".") or domain.endswith("."):
        return None
    return email


def normalize_email_google(value: object) -> str | None:
    """Google form of an email (A3): the Meta form, plus the Gmail rule.

    For ``gmail.com`` and ``googlemail.com`` only, ``+`` and everything after it is dropped from
    the local part, then every ``.`` in it; ``googlemail.com`` is not rewritten to ``gmail.com``.
    This form also links people (SPEC rule 2).

    Returns:
        The normalized address, or ``None`` when unusable (including a Gmail local part that is
        empty after the rule, such as ``+tag@gmail.com``).
    """
    return _gmail_rule(normalize_email_meta(value))


def normalize_phone_e164(value: object, region: str) -> str | None:
    """Google form of a phone number: E.164 with ``+`` (A3), e.g. ``+14155550123``.

    Args:
        value: the raw number in any format the ``phonenumbers`` library reads.
        region: the clinic's ``default_region`` (ISO alpha-2), used for numbers without ``+``.

    Returns:
        The E.164 string, or ``None`` when ``phonenumbers`` cannot parse the value or says the
        number is not valid (``is_valid_number``).
    """
    region_code = region.strip().upper() if isinstance(region, str) else None
    return _e164(value, region_code, {})


def normalize_phone_meta(value: object, region: str) -> str | None:
    """Meta form of a phone number: the E.164 digits without ``+`` (B2), e.g. ``14155550123``."""
    e164 = normalize_phone_e164(value, region)
    return None if e164 is None else e164[1:]


def normalize_name_google(value: object) -> str | None:
    """Google form of a first or last name: trimmed, lowercased, inner spaces kept (A3).

    Runs of inner whitespace become one space (``Mary  Ann`` -> ``mary ann``).

    Returns:
        The name, or ``None`` when it has no letter.
    """
    text = _as_text(value)
    if text is None:
        return None
    name = unicodedata.normalize("NFC", " ".join(text.split()).lower())
    return name if _has_letter(name) else None


def normalize_name_meta(value: object) -> str | None:
    """Meta form of a first or last name: lowercase letters only (B2).

    Punctuation, digits and inner spaces are removed (``O'Brien`` -> ``obrien``, ``Mary Ann`` ->
    ``maryann``); letters outside a-z are kept as UTF-8 (``Valéry`` -> ``valéry``). Removing
    inner spaces follows Meta's Pixel; see the module docstring.

    Returns:
        The name, or ``None`` when it has no letter.
    """
    return _letters(value)


def normalize_city_meta(value: object) -> str | None:
    """Meta form of a city (``ct``): lowercase letters only, no spaces, punctuation or digits.

    Returns:
        E.g. ``sanfrancisco``, or ``None`` when the value has no letter.
    """
    return _letters(value)


def normalize_state_meta(value: object, country: object) -> str | None:
    """Meta form of a state (``st``, B2).

    Args:
        value: the raw state.
        country: the row's country, anything :func:`normalize_country` reads; ``None`` or an
            unknown country applies the non-US rule.

    Returns:
        US (and territories): the 2-letter code lowercased, from a code (``CA``, ``N.Y.``) or a
        full name (``California``); ``None`` for anything else. Elsewhere: lowercase letters
        only, no punctuation or spaces. ``None`` when nothing usable is left.
    """
    letters = _letters(value)
    if letters is None:
        return None
    if _resolve_country(country) not in _US_ZIP_REGIONS:
        return letters
    if len(letters) == 2:
        return letters if letters in _US_STATE_CODES else None
    return _US_STATES.get(letters)


def normalize_zip(value: object, country: object) -> str | None:
    """Meta form of a ZIP or postal code (``zp``, B2); for the US also Google's ``postal_code``.

    Args:
        value: the raw code; a number is read as its digits.
        country: the row's country, anything :func:`normalize_country` reads; ``None`` or an
            unknown country applies the non-US rule.

    Returns:
        US (and territories): the 5-digit ZIP from ``94045`` or ``94045-1234`` (also
        ``940451234``), else ``None``. Elsewhere: lowercase without spaces or dashes, 2 to 10
        ASCII letters and digits (``M1 1AE`` -> ``m11ae``), else ``None``.
    """
    text = _as_text(value)
    if text is None:
        return None
    if _resolve_country(country) in _US_ZIP_REGIONS:
        match = _US_ZIP.fullmatch(text.strip())
        return match.group(1) if match else None
    compact = re.sub(r"[\s\-]", "", text).lower()
    return compact if _POSTAL.fullmatch(compact) else None


def normalize_postal_code_google(value: object, country: object) -> str | None:
    """Google Customer Match ``postal_code`` (sent in clear, A3).

    Returns:
        US (and territories): the 5-digit ZIP as :func:`normalize_zip`. Elsewhere: the code
        uppercased with whitespace collapsed (``m1  1ae`` -> ``M1 1AE``), 2 to 10 ASCII letters
        and digits once spaces and dashes are ignored. ``None`` when unusable.
    """
    meta_form = normalize_zip(value, country)
    text = _as_text(value)
    if meta_form is None or text is None:
        return None
    if _resolve_country(country) in _US_ZIP_REGIONS:
        return meta_form
    return " ".join(text.split()).upper()


def normalize_country(value: object, default_region: str | None) -> str | None:
    """ISO 3166-1 alpha-2 country code, uppercase (Google ``country_code``; Meta hashes it lower).

    Args:
        value: an alpha-2 or alpha-3 code, ``UK``, or a common English name (``United States``,
            ``U.S.A.``); case and punctuation do not matter.
        default_region: used when ``value`` is blank; read by the same rules.

    Returns:
        E.g. ``US``; ``None`` when the value (or, for a blank value, the default) is unknown.
    """
    text = _as_text(value)
    if text is None or not text.strip():
        return None if default_region is None else _lookup_country(default_region)
    return _lookup_country(text)


def hash_identifiers(df: pd.DataFrame, default_region: str) -> pd.DataFrame:
    """Replace raw identifier columns by their per-platform normalized hashes.

    Drops whichever of ``RAW_COLUMNS`` are present and adds every column of ``HASHED_COLUMNS``
    (64 lowercase hex) and ``CLEAR_COLUMNS`` (Google Customer Match ``postal_code`` and
    ``country_code``) as pandas ``string`` dtype; an unusable or absent input is ``pd.NA``, so
    ``isna()`` is true for it. Other columns and the index are kept as they are.

    Work is per distinct value, not per row: each column is factorized, each distinct raw value
    normalized once and each distinct normalized value hashed once. A +1 number in a plain
    format (digits, spaces, ``( ) . -``, optional ``+``) is checked against ``phonenumbers``'
    metadata without a parse; any other phone value is parsed once.

    Args:
        df: rows with any subset of ``RAW_COLUMNS`` (leads have no city, state or country).
        default_region: the clinic's ISO alpha-2 region: parses phones without ``+`` and is the
            country of rows whose ``country`` is blank or absent.

    Returns:
        A new frame; ``df`` is not modified.

    Raises:
        ValueError: ``default_region`` is not an ISO 3166-1 code (a configuration error).
    """
    default_country = normalize_country(default_region, None)
    if default_country is None:
        raise ValueError("default_region is not an ISO 3166-1 country code")
    rows = len(df)
    out: dict[str, _Coded] = {}

    if "country" in df.columns:
        country = _per_value(df["country"], lambda v: normalize_country(v, default_country))
    else:
        country = _Coded(np.zeros(rows, dtype=np.intp), [default_country])
    out["country_code"] = country
    out["country_m"] = _hashed(_mapped(country, _lower_or_none))

    if "email" in df.columns:
        email_meta = _per_value(df["email"], normalize_email_meta)
        out["em_g"] = _hashed(_mapped(email_meta, _gmail_rule))
        out["em_m"] = _hashed(email_meta)
    if "phone" in df.columns:
        cache: dict[str, str | None] = {}
        e164 = _per_value(df["phone"], lambda v: _e164(v, default_country, cache))
        out["ph_g"] = _hashed(e164)
        out["ph_m"] = _hashed(_mapped(e164, _drop_plus))
    for column, suffix in (("first_name", "fn"), ("last_name", "ln")):
        if column in df.columns:
            raw = _per_value(df[column], _as_text)
            out[f"{suffix}_g"] = _hashed(_mapped(raw, normalize_name_google))
            out[f"{suffix}_m"] = _hashed(_mapped(raw, normalize_name_meta))
    if "city" in df.columns:
        out["ct_m"] = _hashed(_per_value(df["city"], normalize_city_meta))
    if "state" in df.columns:
        state = _mapped_pairs(_pairs(df["state"], country), normalize_state_meta)
        out["st_m"] = _hashed(state)
    if "zip" in df.columns:
        zip_and_country = _pairs(df["zip"], country)
        out["zp_m"] = _hashed(_mapped_pairs(zip_and_country, normalize_zip))
        out["postal_code"] = _mapped_pairs(zip_and_country, normalize_postal_code_google)

    missing = _Coded(np.zeros(rows, dtype=np.intp), [None])
    added = {column: _to_strings(out.get(column, missing)) for column in (*HASHED_COLUMNS, *CLEAR_COLUMNS)}
    return df.drop(columns=[c for c in RAW_COLUMNS if c in df.columns]).assign(**added)


def _as_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        whole = int(value)
    elif isinstance(value, numbers.Real) and float(value).is_integer():
        whole = int(float(value))
    else:
        return None
    return str(whole) if abs(whole) < _MAX_NUMBER else None


def _has_letter(text: str) -> bool:
    return any(char.isalpha() for char in text)


def _letters(value: object) -> str | None:
    """Lowercase, keep letters and their combining marks only, NFC-composed."""
    text = _as_text(value)
    if text is None:
        return None
    if text.isascii():
        letters = _NOT_ASCII_LETTER.sub("", text.lower())
        return letters or None
    lowered = unicodedata.normalize("NFC", text).lower()
    kept = "".join(c for c in lowered if unicodedata.category(c)[0] in "LM")
    letters = unicodedata.normalize("NFC", kept)
    return letters if _has_letter(letters) else None


def _gmail_rule(email: str | None) -> str | None:
    if email is None:
        return None
    local, _, domain = email.partition("@")
    if domain not in _GMAIL_DOMAINS:
        return email
    local = local.split("+", 1)[0].replace(".", "")
    return f"{local}@{domain}" if local else None


def _phone_key(text: str) -> str | None:
    """Digits with the leading ``+`` kept, when the text holds nothing else phonenumbers reads."""
    stripped = text.strip()
    plus = stripped.startswith("+")
    digits = (stripped[1:] if plus else stripped).translate(_PHONE_PUNCTUATION)
    if not (digits.isdigit() and digits.isascii()) or len(stripped) > _PHONE_MAX_INPUT:
        return None
    return "+" + digits if plus else digits


def _nanp_national(key: str, region: str | None) -> str | None:
    """The 10 national digits when phonenumbers would read ``key`` as a +1 number."""
    national = None
    if len(key) == 12 and key.startswith("+1"):
        national = key[2:]
    elif region in _NANP_REGIONS and len(key) == 11 and key.startswith("1"):
        national = key[1:]
    elif region in _NANP_REGIONS and len(key) == 10:
        national = key
    # area codes start with 2-9; anything else goes through the parser
    return national if national is not None and national[0] not in "01" else None


def _nanp_e164(national: str) -> str | None:
    # for country code 1 the library tries the main region first, so a number valid there is
    # valid; anything else gets the library's full answer
    if _MAIN_REGION_GENERAL.fullmatch(national) and _MAIN_REGION_TYPES.fullmatch(national):
        return "+1" + national
    number = phonenumbers.PhoneNumber(country_code=1, national_number=int(national))
    return "+1" + national if phonenumbers.is_valid_number(number) else None


def _ten_digit_patterns(descs: Iterable[phonenumbers.PhoneNumberDesc | None]) -> re.Pattern[str]:
    """One regex for the descs that ``phonenumbers`` would match against a 10-digit number.

    Mirrors the library's own test (length allowed, then a full match of the non-empty pattern)
    from its public metadata; ``(?!)`` (never matches) when no desc applies.
    """
    patterns = [
        f"(?:{desc.national_number_pattern})"
        for desc in descs
        if desc is not None
        and desc.national_number_pattern
        and (not desc.possible_length or 10 in desc.possible_length)
    ]
    return re.compile("|".join(patterns) or "(?!)")


def _main_region_patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(_NANP_MAIN_REGION)
    if metadata is None:
        never = re.compile("(?!)")
        return never, never
    # the number types phonenumbers checks, in its order; any match means a known type
    types = (
        metadata.premium_rate, metadata.toll_free, metadata.shared_cost, metadata.voip,
        metadata.personal_number, metadata.pager, metadata.uan, metadata.voicemail,
        metadata.fixed_line, metadata.mobile,
    )  # fmt: skip
    return _ten_digit_patterns([metadata.general_desc]), _ten_digit_patterns(types)


_MAIN_REGION_GENERAL, _MAIN_REGION_TYPES = _main_region_patterns()


def _parse_e164(text: str, region: str | None) -> str | None:
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _e164(value: object, region: str | None, cache: dict[str, str | None]) -> str | None:
    """E.164 of ``value``; ``cache`` keeps the answer per +1 national number across calls."""
    text = _as_text(value)
    if text is None:
        return None
    key = _phone_key(text)
    national = None if key is None else _nanp_national(key, region)
    if national is None:
        return _parse_e164(text, region)
    if national not in cache:
        cache[national] = _nanp_e164(national)
    return cache[national]


def _resolve_country(country: object) -> str | None:
    return normalize_country(country, None)


def _lookup_country(text: str) -> str | None:
    if text in _ALPHA2:
        return text
    key = _letters(text)
    if key is None:
        return None
    if len(key) == 2 and key.upper() in _ALPHA2:
        return key.upper()
    if len(key) == 3 and key.upper() in _ALPHA3_TO_ALPHA2:
        return _ALPHA3_TO_ALPHA2[key.upper()]
    return _COUNTRY_NAMES.get(key)


def _lower_or_none(value: str | None) -> str | None:
    return None if value is None else value.lower()


def _drop_plus(value: str | None) -> str | None:
    return None if value is None else value[1:]


class _Coded(NamedTuple):
    """A column as one code per row into a list of distinct values (computed once each)."""

    codes: npt.NDArray[np.intp]
    values: list[str | None]


def _factorize(column: pd.Series) -> tuple[npt.NDArray[np.intp], list[object]]:
    """Distinct values of ``column`` plus ``None`` last, and each row's position among them."""
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    # a missing cell (code -1) points at the trailing None
    return np.where(codes < 0, len(uniques), codes).astype(np.intp), [*uniques, None]


def _per_value(column: pd.Series, normalize: Callable[[object], str | None]) -> _Coded:
    """Normalize each distinct value of ``column`` once."""
    codes, values = _factorize(column)
    return _compact(_Coded(codes, [normalize(v) for v in values]))


def _pairs(
    column: pd.Series, country: _Coded
) -> tuple[npt.NDArray[np.intp], list[tuple[object, str | None]]]:
    """Each row's position among the distinct (raw value, country) pairs, and those pairs."""
    codes, values = _factorize(column)
    width = len(country.values)
    pair_codes, pairs = pd.factorize(codes.astype(np.int64) * width + country.codes)
    distinct = [(values[p // width], country.values[p % width]) for p in pairs]
    return pair_codes.astype(np.intp), distinct


def _mapped_pairs(
    pairs: tuple[npt.NDArray[np.intp], list[tuple[object, str | None]]],
    normalize: Callable[[object, object], str | None],
) -> _Coded:
    codes, distinct = pairs
    return _compact(_Coded(codes, [normalize(value, country) for value, country in distinct]))


def _mapped(coded: _Coded, function: Callable[[str | None], str | None]) -> _Coded:
    return _compact(_Coded(coded.codes, [function(v) for v in coded.values]))


def _hashed(coded: _Coded) -> _Coded:
    """Hash each value; ``coded`` is compact, so no value is hashed twice."""
    sha256 = hashlib.sha256  # the same as sha256_hex, without a call per value
    hashes = [None if v is None else sha256(v.encode("utf-8")).hexdigest() for v in coded.values]
    return _Coded(coded.codes, hashes)


def _compact(coded: _Coded) -> _Coded:
    """Merge equal values so that later per-value work runs once per distinct result."""
    remap, distinct = _factorize(pd.Series(_object_array(coded.values), dtype=object))
    return _Coded(remap[coded.codes], [v if isinstance(v, str) else None for v in distinct])


def _object_array(values: list[str | None]) -> npt.NDArray[np.object_]:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _to_strings(coded: _Coded) -> pd.api.extensions.ExtensionArray:
    return pd.array(_object_array(coded.values)[coded.codes], dtype="string")
