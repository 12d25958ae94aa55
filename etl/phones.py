"""Phone numbers to E.164, with a fast path for +1 numbers typed in a plain format.

Why: ``etl.identifiers`` hashes the E.164 form of every phone (SPEC rule 9, ``shared/SPEC.md``;
``shared/reference/ad-platforms.md`` A3 and B2), and ``phonenumbers.parse`` is the slow part of
hashing a large export. A +1 number made of digits, spaces, ``( ) . -`` and an optional ``+`` is
checked against ``phonenumbers``' own public metadata without a parse, with the answer the
parser would give; any other value is parsed once. The contract of ``hash_identifiers`` is in
``docs/architecture.md`` ("Identifier columns").

A large export holds close to one distinct phone text per row (each person types their number
their own way), so ``to_e164_many`` finds the plain +1 texts of a whole column with arrow kernels
and runs the metadata check once per distinct national number, not once per text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

import numpy as np
import phonenumbers
import pyarrow as pa
import pyarrow.compute as pc

from etl.identifier_text import as_text

# phonenumbers reads digits mixed with these (and one leading +) exactly as it reads the bare
# digits, so those digits are a safe cache key; longer inputs than 250 it refuses
_PHONE_PUNCTUATION: Final = str.maketrans("", "", " ().-")
_PHONE_MAX_INPUT: Final = 250
_NANP_REGIONS: Final = frozenset(phonenumbers.COUNTRY_CODE_TO_REGION_CODE[1])
_NANP_MAIN_REGION: Final = phonenumbers.region_code_for_country_code(1)


def to_e164(value: object, region: str | None, cache: dict[str, str | None]) -> str | None:
    """E.164 of ``value``; ``cache`` keeps the answer per +1 national number across calls."""
    text = as_text(value)
    if text is None:
        return None
    key = _phone_key(text)
    national = None if key is None else _nanp_national(key, region)
    if national is None:
        return _parse_e164(text, region)
    if national not in cache:
        cache[national] = _nanp_e164(national)
    return cache[national]


def to_e164_many(texts: pa.Array, region: str | None) -> list[str | None]:
    """``to_e164`` of each text of an arrow string array (no nulls), in order.

    The texts that ``_phone_key`` and ``_nanp_national`` would send down the +1 shortcut (an
    optional leading ``+`` then only digits and `` ().-``; 11 digits starting with 1, or 10
    digits without ``+`` in a +1 region; an area code starting 2-9) are found in bulk, and
    ``_nanp_e164`` answers once per distinct national number; ``to_e164`` itself answers the
    rest, so every answer is the one ``to_e164`` gives.
    """
    digits = texts
    for char in "+ ().-":
        digits = pc.replace_substring(digits, char, "")
    count = pc.utf8_length(digits).to_numpy(zero_copy_only=False)
    plus = _flags(pc.starts_with(texts, "+"))
    one = _flags(pc.starts_with(digits, "1"))
    plain = _flags(pc.match_substring_regex(texts, r"^\+?[0-9 ().\-]*$"))
    plain &= _flags(pc.less_equal(pc.utf8_length(texts), _PHONE_MAX_INPUT))
    shortcut = plus & (count == 11) & one
    if region in _NANP_REGIONS:
        shortcut |= ~plus & (((count == 11) & one) | (count == 10))
    national = pc.if_else(pa.array(count == 11), pc.utf8_slice_codeunits(digits, 1), digits)
    area_ok = ~_flags(pc.or_(pc.starts_with(national, "0"), pc.starts_with(national, "1")))
    is_fast = plain & shortcut & area_ok
    encoded = national.filter(pa.array(is_fast)).dictionary_encode()
    per_national = _objects([_nanp_e164(n) for n in encoded.dictionary.to_pylist()])
    answers = np.empty(len(texts), dtype=object)
    answers[is_fast] = per_national[encoded.indices.to_numpy(zero_copy_only=False)]
    cache: dict[str, str | None] = {}
    others = texts.filter(pa.array(~is_fast)).to_pylist()
    answers[~is_fast] = _objects([to_e164(text, region, cache) for text in others])
    return answers.tolist()


def _objects(values: list[str | None]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _flags(mask: pa.Array) -> np.ndarray:
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


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
    elif region in _NANP_REGIONS and len(key) == 10 and not key.startswith("+"):
        national = key  # (a "+" and 9 digits is another country's number: +687 200000)
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
