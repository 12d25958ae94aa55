"""Identifier normalization and hashing against the published vectors of
shared/reference/ad-platforms.md A3 (Google) and B2 (Meta), plus properties and the frame API."""

from __future__ import annotations

import base64
import functools
import math
import re
import string
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import phonenumbers
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from etl.identifiers import (
    CLEAR_COLUMNS,
    CLICK_ID,
    FBC,
    FBP,
    HASHED_COLUMNS,
    RAW_COLUMNS,
    hash_identifiers,
    normalize_and_hash,
    normalize_city_meta,
    normalize_country,
    normalize_email_google,
    normalize_email_meta,
    normalize_name_google,
    normalize_name_meta,
    normalize_phone_e164,
    normalize_phone_meta,
    normalize_postal_code_google,
    normalize_state_meta,
    normalize_zip,
    sha256_hex,
    usable_click_ids,
)

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _meta_country(value: object) -> str | None:
    code = normalize_country(value, None)
    return None if code is None else code.lower()


def _e164_us(value: object) -> str | None:
    return normalize_phone_e164(value, "US")


def _meta_phone_us(value: object) -> str | None:
    return normalize_phone_meta(value, "US")


def _state_us(value: object) -> str | None:
    return normalize_state_meta(value, "US")


def _zip_us(value: object) -> str | None:
    return normalize_zip(value, "US")


# (normalizer, input, normalized, sha256), exactly as printed in ad-platforms.md A3
GOOGLE_VECTORS = [
    pytest.param(
        normalize_email_google, "  Jane.Doe+Promo@GMail.com ", "janedoe@gmail.com",
        "d6117306485ed0e50afab3ac871e98f81699151f30281527d63ff5f233656c69", id="email-gmail",
    ),
    pytest.param(
        normalize_email_google, "J.Doe+x@GoogleMail.com", "jdoe@googlemail.com",
        "e9676b23c1c188a4f2eed3c1cb325435d739786b947acf91fc1812a01570292f", id="email-googlemail",
    ),
    pytest.param(
        normalize_email_google, "Jane.Doe+Promo@Example.com", "jane.doe+promo@example.com",
        "c3374bcfe3572e09f37602e0e179782352c5e117a4a3767824abbaa21bbdef8b", id="email-other-domain",
    ),
    pytest.param(
        normalize_email_google, "test@gmail.com", "test@gmail.com",
        "87924606b4131a8aceeeae8868531fbb9712aaa07a5d3a756b26ce0f5d6ca674", id="email-segment",
    ),
    pytest.param(
        _e164_us, "+1 800 5550102", "+18005550102",
        "c5383c2eeada28210d27f011bc127d4f9562cf38ff0c9bba33dd45ae79b9fe7c", id="phone-plus",
    ),
    pytest.param(
        _e164_us, "(800) 555-0102", "+18005550102",
        "c5383c2eeada28210d27f011bc127d4f9562cf38ff0c9bba33dd45ae79b9fe7c", id="phone-national",
    ),
    pytest.param(
        _e164_us, "(415) 555-0123", "+14155550123",
        "36a2cef4ff9bf7a1abd2a93359136b870393be4106e6c5d19b72ff564f9deca4", id="phone-415",
    ),
    pytest.param(
        normalize_name_google, "  Jane ", "jane",
        "81f8f6dde88365f3928796ec7aa53f72820b06db8664f5fe76a7eb13e24546a2", id="name-trim",
    ),
    pytest.param(
        normalize_name_google, "Mary Ann", "mary ann",
        "343b97011010c3549fe7fcd6c226ed9431ea37b0b77ed78f6300a0098925faf1", id="name-inner-space",
    ),
]  # fmt: skip

# the rows of ad-platforms.md B2 for our fields (date of birth and gender are not ours)
META_VECTORS = [
    pytest.param(
        normalize_email_meta, "John_Smith@gmail.com", "john_smith@gmail.com",
        "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f", id="em-meta-docs",
    ),
    pytest.param(
        _meta_phone_us, "(650)555-1212", "16505551212",
        "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176", id="ph-meta-docs",
    ),
    pytest.param(
        normalize_name_meta, "Mary", "mary",
        "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec", id="fn-meta-docs",
    ),
    pytest.param(
        _meta_country, "United States", "us",
        "79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621", id="country-meta-docs",
    ),
    pytest.param(
        normalize_email_meta, "Jane.Doe+Promo@GMail.com", "jane.doe+promo@gmail.com",
        "5f0d1df1fc49e30424381b57b1d4c73e067772a4267dde043a19b026935602c8", id="em-no-gmail-rule",
    ),
    pytest.param(
        _meta_phone_us, "(415) 555-0123", "14155550123",
        "413ba75461ab5f99d36820e561ea97e2bd80f9cb586f7ecea6cf4c496518950a", id="ph-no-plus",
    ),
    pytest.param(
        normalize_name_meta, "O'Brien", "obrien",
        "b4cb6cb33fe4b865868de825023a1e2790dc12ac01ecc8d7c5afe8254071c8ba", id="ln-punctuation",
    ),
    pytest.param(
        normalize_city_meta, "San Francisco", "sanfrancisco",
        "1a6bd4d9d79dc0a79b53795c70d3349fa9e38968a3fbefbfe8783efb1d2b6aac", id="ct-no-spaces",
    ),
    pytest.param(
        _state_us, "CA", "ca",
        "6959097001d10501ac7d54c0bdb8db61420f658f2922cc26e46d536119a31126", id="st-code",
    ),
    pytest.param(
        _zip_us, "94045-1234", "94045",
        "7d2d33fb3ea552a80a8c01bf717fdade8c601e84e456f3a3cfc4170c49ff7993", id="zp-zip-plus-4",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("normalize", "raw", "normalized", "digest"), GOOGLE_VECTORS)
def test_google_published_vectors(
    normalize: Callable[[object], str | None], raw: str, normalized: str, digest: str
) -> None:
    assert normalize(raw) == normalized
    assert sha256_hex(normalized) == digest
    assert normalize_and_hash(raw, normalize) == digest


@pytest.mark.parametrize(("normalize", "raw", "normalized", "digest"), META_VECTORS)
def test_meta_published_vectors(
    normalize: Callable[[object], str | None], raw: str, normalized: str, digest: str
) -> None:
    assert normalize(raw) == normalized
    assert sha256_hex(normalized) == digest
    assert normalize_and_hash(raw, normalize) == digest


def test_phone_with_and_without_plus_hash_differently() -> None:
    google = normalize_and_hash("(800) 555-0102", _e164_us)
    meta = normalize_and_hash("(800) 555-0102", _meta_phone_us)
    assert google == "c5383c2eeada28210d27f011bc127d4f9562cf38ff0c9bba33dd45ae79b9fe7c"
    assert meta is not None
    assert meta.startswith("25e2a8bc")
    assert meta.endswith("7603")
    assert meta != google


def test_hash_is_hex_of_the_digest_google_prints_in_base64() -> None:
    digest = bytes.fromhex(sha256_hex("janedoe@gmail.com"))
    assert base64.b64encode(digest).decode() == "1hFzBkhe0OUK+rOshx6Y+BaZFR8wKBUn1j/18jNlbGk="


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("janedoe@gmail.com", id="plain"),
        pytest.param("jane.doe@gmail.com", id="dot"),
        pytest.param("Jane.Doe+spa@gmail.com", id="dot-and-plus"),
        pytest.param("janedoe+a+b@gmail.com", id="two-plus"),
        pytest.param(" j.a.n.e.d.o.e@GMAIL.COM ", id="many-dots-upper"),
    ],
)
def test_gmail_variants_share_the_google_form_and_hash(raw: str) -> None:
    assert normalize_email_google(raw) == "janedoe@gmail.com"
    assert normalize_and_hash(raw, normalize_email_google) == (
        "d6117306485ed0e50afab3ac871e98f81699151f30281527d63ff5f233656c69"
    )


@pytest.mark.parametrize(
    ("raw", "google"),
    [
        pytest.param("Jane.Doe+spa@yahoo.com", "jane.doe+spa@yahoo.com", id="yahoo-keeps"),
        pytest.param("j.doe+x@googlemail.com", "jdoe@googlemail.com", id="googlemail-not-gmail"),
        pytest.param("j.doe@mail.gmail.com", "j.doe@mail.gmail.com", id="gmail-subdomain-keeps"),
    ],
)
def test_gmail_rule_only_for_gmail_domains(raw: str, google: str) -> None:
    assert normalize_email_google(raw) == google
    assert normalize_email_meta(raw) == raw.lower()


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(None, id="none"),
        pytest.param(float("nan"), id="nan"),
        pytest.param(pd.NA, id="pd-na"),
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("jane", id="no-at"),
        pytest.param("jane@localhost", id="no-dot-in-domain"),
        pytest.param("@example.com", id="empty-local"),
        pytest.param("a@b@example.com", id="two-at"),
        pytest.param("jane doe@example.com", id="inner-space"),
        pytest.param("jane@example.com.", id="trailing-dot"),
        pytest.param(12345, id="number"),
    ],
)
def test_unusable_emails_are_none(raw: object) -> None:
    assert normalize_email_google(raw) is None
    assert normalize_email_meta(raw) is None


@pytest.mark.parametrize("raw", ["+promo@gmail.com", "...@googlemail.com"])
def test_gmail_local_part_empty_after_the_rule_is_unusable_for_google_only(raw: str) -> None:
    assert normalize_email_google(raw) is None
    assert normalize_email_meta(raw) == raw


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("(415) 555-0123", id="parens"),
        pytest.param("415.555.0123", id="dots"),
        pytest.param("+1 415 555 0123", id="international"),
        pytest.param("1-415-555-0123", id="national-prefix"),
        pytest.param("4155550123", id="digits"),
        pytest.param(" +14155550123 ", id="e164-padded"),
        pytest.param("tel:+1-415-555-0123", id="tel-uri"),
        pytest.param(4155550123, id="int"),
        pytest.param(4155550123.0, id="float-from-csv"),
    ],
)
def test_phone_formats_normalize_to_e164(raw: object) -> None:
    assert normalize_phone_e164(raw, "US") == "+14155550123"
    assert normalize_phone_meta(raw, "US") == "14155550123"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("123", id="too-short"),
        pytest.param("555-0100", id="no-area-code"),
        pytest.param("call me", id="letters"),
        pytest.param("(415) 155-0123", id="exchange-starts-with-1"),
        pytest.param("+1 415 555 01234", id="too-long"),
        pytest.param("", id="empty"),
        pytest.param(None, id="none"),
        pytest.param(float("nan"), id="nan"),
        pytest.param(True, id="bool"),
    ],
)
def test_invalid_phones_are_none(raw: object) -> None:
    assert normalize_phone_e164(raw, "US") is None
    assert normalize_phone_meta(raw, "US") is None


@pytest.mark.parametrize(
    ("raw", "region", "e164"),
    [
        pytest.param("020 7946 0018", "GB", "+442079460018", id="gb-national"),
        pytest.param("+44 20 7946 0018", "US", "+442079460018", id="gb-from-us-clinic"),
        pytest.param("011 44 20 7946 0018", "US", "+442079460018", id="us-exit-code"),
        pytest.param("(416) 555-0199", "CA", "+14165550199", id="canada"),
        pytest.param("4155550123", "ZZ", None, id="unknown-region"),
    ],
)
def test_phone_regions(raw: str, region: str, e164: str | None) -> None:
    assert normalize_phone_e164(raw, region) == e164


def _library_e164(text: str, region: str) -> str | None:
    """The plain phonenumbers reading that normalize_phone_e164 must reproduce exactly."""
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


@pytest.mark.parametrize("region", ["US", "CA", "PR", "JM", "AG", "GB", "DE"])
@pytest.mark.parametrize(
    "raw",
    [
        "4155550123", "14155550123", "+14155550123", "1 (268) 464-1234", "268 464 1234",
        "4641234", "(876) 555-0123", "18765550123", "+1 787 555 0123", "7875550123",
        "0155550123", "1 0155550123", "+1 015 555 0123", "+44 20 7946 0018", "02079460018",
        "030 1234567", "+49 30 1234567", "001 415 555 0123", "011 415 555 0123",
    ],
)  # fmt: skip
def test_phone_shortcut_matches_the_library(raw: str, region: str) -> None:
    assert normalize_phone_e164(raw, region) == _library_e164(raw, region)


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="0123456789 ().-+", max_size=20),
    st.sampled_from(["US", "CA", "PR", "BS", "GB"]),
)
@example("+1 (415) 555-0123", "US")
@example("1 415 555 0123", "CA")
@example("+687200000", "US")  # "+" and 9 digits: ten characters, but not a +1 national number
def test_phone_shortcut_matches_the_library_on_any_punctuation(text: str, region: str) -> None:
    assert normalize_phone_e164(text, region) == _library_e164(text, region)


@settings(max_examples=300, deadline=None)
@given(st.integers(2_000_000_000, 9_999_999_999), st.sampled_from(["", "1", "+1 ", "(", "1-"]))
def test_phone_shortcut_matches_the_library_on_nanp_numbers(number: int, prefix: str) -> None:
    text = prefix + str(number)
    assert normalize_phone_e164(text, "US") == _library_e164(text, "US")


@pytest.mark.parametrize(
    ("raw", "google", "meta"),
    [
        pytest.param("  Mary   Ann ", "mary ann", "maryann", id="spaces"),
        pytest.param("Jean-Paul", "jean-paul", "jeanpaul", id="hyphen"),
        pytest.param("O'Brien", "o'brien", "obrien", id="apostrophe"),
        pytest.param("Valéry", "valéry", "valéry", id="accent-kept"),
        pytest.param("Vale\u0301ry", "valéry", "valéry", id="decomposed-accent-composed"),
        pytest.param("ZOË", "zoë", "zoë", id="upper-diaeresis"),
        pytest.param("Smith Jr.", "smith jr.", "smithjr", id="suffix-not-stripped"),
        pytest.param("-", None, None, id="placeholder"),
        pytest.param("", None, None, id="empty"),
        pytest.param(None, None, None, id="none"),
    ],
)
def test_names(raw: object, google: str | None, meta: str | None) -> None:
    assert normalize_name_google(raw) == google
    assert normalize_name_meta(raw) == meta


@pytest.mark.parametrize(
    ("raw", "city"),
    [
        pytest.param("San Francisco", "sanfrancisco", id="space"),
        pytest.param("  St. Louis ", "stlouis", id="punctuation"),
        pytest.param("Winston-Salem", "winstonsalem", id="hyphen"),
        pytest.param("Montréal", "montréal", id="accent"),
        pytest.param("29 Palms", "palms", id="digits"),
        pytest.param("123", None, id="only-digits"),
    ],
)
def test_city(raw: str, city: str | None) -> None:
    assert normalize_city_meta(raw) == city


@pytest.mark.parametrize(
    ("raw", "country", "state"),
    [
        pytest.param("CA", "US", "ca", id="code"),
        pytest.param("California", "US", "ca", id="name"),
        pytest.param(" new york ", "USA", "ny", id="two-word-name"),
        pytest.param("N.Y.", "United States", "ny", id="dotted-code"),
        pytest.param("District of Columbia", "US", "dc", id="dc"),
        pytest.param("PR", "PR", "pr", id="territory"),
        pytest.param("ZZ", "US", None, id="unknown-code"),
        pytest.param("Calif.", "US", None, id="unknown-abbreviation"),
        pytest.param("ON", "CA", "on", id="canada-code"),
        pytest.param("Île-de-France", "FR", "îledefrance", id="non-us-letters-only"),
        pytest.param("Ontario", None, "ontario", id="unknown-country-non-us-rule"),
        pytest.param("", "US", None, id="blank"),
    ],
)
def test_state(raw: str, country: str | None, state: str | None) -> None:
    assert normalize_state_meta(raw, country) == state


@pytest.mark.parametrize(
    ("raw", "country", "meta", "google"),
    [
        pytest.param("94045", "US", "94045", "94045", id="five"),
        pytest.param("94045-1234", "US", "94045", "94045", id="zip-plus-4"),
        pytest.param(" 94045 1234 ", "US", "94045", "94045", id="zip-plus-4-space"),
        pytest.param("940451234", "US", "94045", "94045", id="nine-digits"),
        pytest.param("94045-12", "US", "94045", "94045", id="cut-short-extension"),
        pytest.param("ZIP 94045", "US", None, None, id="words"),
        pytest.param(94045, "US", "94045", "94045", id="int"),
        pytest.param("2134", "US", None, None, id="lost-leading-zero"),
        pytest.param("9404", "US", None, None, id="four-digits"),
        pytest.param("ABCDE", "US", None, None, id="letters"),
        pytest.param("00907", "PR", "00907", "00907", id="territory"),
        pytest.param("M1 1AE", "GB", "m11ae", "M1 1AE", id="uk"),
        pytest.param("k1a-0b1", "CA", "k1a0b1", "K1A 0B1", id="canada-dash-for-its-space"),
        pytest.param(" k1a  0b1 ", "CA", "k1a0b1", "K1A 0B1", id="canada-spaces"),
        pytest.param("K1A - 0B1", "CA", "k1a0b1", "K1A 0B1", id="dash-with-spaces"),
        pytest.param("1234-567", "PT", "1234567", "1234-567", id="portugal"),
        pytest.param("154 - 0023", "JP", "1540023", "154-0023", id="japan-dash"),
        pytest.param("154 0023", "JP", "1540023", "154-0023", id="japan-space-for-its-dash"),
        pytest.param("26133", "DE", "26133", "26133", id="germany"),
        # a shifted or misfiled cell that looks like some code but not like the row's country's
        # leaves hashed for Meta at most, never in clear
        pytest.param("PT-000261", "GB", "pt000261", None, id="patient-number-in-a-uk-zip"),
        pytest.param("6287000248", "GB", "6287000248", None, id="phone-digits-in-a-uk-zip"),
        pytest.param("PT-000261", "DE", "pt000261", None, id="patient-number-in-a-german-zip"),
        pytest.param("12345", "AE", "12345", None, id="country-without-postal-codes"),
        pytest.param("sw1a 1aa", "GB", "sw1a1aa", "SW1A 1AA", id="uk-long"),
        pytest.param("ABCDE", "GB", "abcde", None, id="no-digit-not-sent-to-google"),
        pytest.param("n/a", "GB", None, None, id="placeholder"),
        pytest.param(None, "US", None, None, id="none"),
    ],
)
def test_zip_and_postal_code(raw: object, country: str, meta: str | None, google: str | None) -> None:
    assert normalize_zip(raw, country) == meta
    assert normalize_postal_code_google(raw, country) == google


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        pytest.param("US", "US", id="alpha-2"),
        pytest.param("us", "US", id="alpha-2-lower"),
        pytest.param("USA", "US", id="alpha-3"),
        pytest.param("U.S.", "US", id="dotted"),
        pytest.param("U.S.A.", "US", id="dotted-alpha-3"),
        pytest.param("United States", "US", id="name"),
        pytest.param("united states of america", "US", id="long-name"),
        pytest.param("DEU", "DE", id="alpha-3-germany"),
        pytest.param("UK", "GB", id="uk"),
        pytest.param("Great Britain", "GB", id="great-britain"),
        pytest.param("Canada", "CA", id="canada"),
        pytest.param("", "MX", id="blank-default"),
        pytest.param(None, "MX", id="none-default"),
        pytest.param("Narnia", None, id="unknown-name"),
        pytest.param("ZZ", None, id="unknown-code"),
        pytest.param(1, None, id="number"),
    ],
)
def test_country(raw: object, code: str | None) -> None:
    assert normalize_country(raw, "mx") == code


def test_country_without_default() -> None:
    assert normalize_country("", None) is None
    assert normalize_country(" ", "Narnia") is None


anything = st.one_of(
    st.none(),
    st.text(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.binary(max_size=10),
    st.just(pd.NA),
    st.just(np.nan),
    st.builds(np.int64, st.integers(-(2**63), 2**63 - 1)),
)

SCALARS: list[Callable[[object], str | None]] = [
    normalize_email_google,
    normalize_email_meta,
    normalize_name_google,
    normalize_name_meta,
    normalize_city_meta,
    functools.partial(normalize_phone_e164, region="US"),
    functools.partial(normalize_phone_meta, region="US"),
    functools.partial(normalize_phone_e164, region="GB"),
    functools.partial(normalize_state_meta, country="US"),
    functools.partial(normalize_state_meta, country="FR"),
    functools.partial(normalize_zip, country="US"),
    functools.partial(normalize_zip, country="GB"),
    functools.partial(normalize_postal_code_google, country="GB"),
    functools.partial(normalize_country, default_region="US"),
    functools.partial(normalize_country, default_region=None),
]


@settings(max_examples=200, deadline=None)
@given(anything)
def test_normalizers_never_raise_and_hashes_are_hex(value: object) -> None:
    for normalize in SCALARS:
        normalized = normalize(value)
        assert normalized is None or isinstance(normalized, str)
        digest = normalize_and_hash(value, normalize)
        assert digest is None or HEX64.match(digest)


IDEMPOTENT: list[Callable[[object], str | None]] = [
    normalize_email_google,
    normalize_email_meta,
    normalize_name_google,
    normalize_name_meta,
    normalize_city_meta,
    functools.partial(normalize_state_meta, country="US"),
    functools.partial(normalize_state_meta, country="FR"),
    functools.partial(normalize_zip, country="US"),
    functools.partial(normalize_zip, country="GB"),
    functools.partial(normalize_postal_code_google, country="GB"),
    functools.partial(normalize_country, default_region="US"),
]


@settings(max_examples=300, deadline=None)
@given(st.text())
@example("Jane.Doe+Promo@GMail.com")
@example(" Mary  Ann ")
@example("Vale\u0301ry")
@example("İstanbul")
@example("94045-1234")
def test_normalizers_are_idempotent(text: str) -> None:
    for normalize in IDEMPOTENT:
        once = normalize(text)
        if once is not None:
            assert normalize(once) == once


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet="0123456789 +-()", min_size=7)))
@example("(415) 555-0123")
@example("+44 20 7946 0018")
def test_e164_output_reads_back_unchanged(text: str) -> None:
    for region in ("US", "GB"):
        once = normalize_phone_e164(text, region)
        if once is not None:
            assert normalize_phone_e164(once, region) == once
            assert normalize_phone_e164(once, "DE") == once


def _people() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "appointment_id": ["a1", "a2", "a3", "a4"],
            "email": ["Jane.Doe+Promo@GMail.com", " janedoe@gmail.com", "not an email", None],
            "phone": ["(415) 555-0123", "+1 415 555 0123", "555-0100", np.nan],
            "first_name": ["Mary Ann", "MARY  ANN", "-", None],
            "last_name": ["O'Brien", "obrien", "", None],
            "city": ["San Francisco", "san francisco", "", None],
            "state": ["CA", "California", "??", None],
            "zip": ["94045-1234", "94045", "1", None],
            "country": ["United States", "US", "Narnia", None],
            "revenue": [100.0, 0.0, 5.0, 1.0],
        },
        index=pd.Index([10, 10, 11, 12], name="row"),
    )


def test_hash_identifiers_replaces_raw_columns() -> None:
    people = _people()
    before = people.copy()
    out = hash_identifiers(people, "US")
    assert list(out.columns) == [
        "appointment_id", "revenue", *HASHED_COLUMNS, *CLEAR_COLUMNS,
    ]  # fmt: skip
    assert not set(RAW_COLUMNS) & set(out.columns)
    assert out.index.equals(people.index)
    pd.testing.assert_frame_equal(people, before)
    for column in (*HASHED_COLUMNS, *CLEAR_COLUMNS):
        assert isinstance(out[column].dtype, pd.CategoricalDtype), column
        assert all(isinstance(v, str) for v in out[column].cat.categories), column
    for column in HASHED_COLUMNS:
        assert out[column].dropna().str.fullmatch(r"[0-9a-f]{64}").all(), column


def test_hash_identifiers_values_match_the_scalar_normalizers() -> None:
    out = hash_identifiers(_people(), "US")
    first = out.iloc[0]
    assert first["em_g"] == sha256_hex("janedoe@gmail.com")
    assert first["em_m"] == sha256_hex("jane.doe+promo@gmail.com")
    assert first["ph_g"] == sha256_hex("+14155550123")
    assert first["ph_m"] == sha256_hex("14155550123")
    assert first["fn_g"] == sha256_hex("mary ann")
    assert first["fn_m"] == sha256_hex("maryann")
    assert first["ln_g"] == sha256_hex("o'brien")
    assert first["ln_m"] == sha256_hex("obrien")
    assert first["ct_m"] == sha256_hex("sanfrancisco")
    assert first["st_m"] == sha256_hex("ca")
    assert first["zp_m"] == sha256_hex("94045")
    assert first["country_m"] == sha256_hex("us")
    assert first["postal_code"] == "94045"
    assert first["country_code"] == "US"


def test_hash_identifiers_same_person_variants_agree() -> None:
    out = hash_identifiers(_people(), "US")
    same = ["em_g", "ph_g", "ph_m", "fn_g", "fn_m", "ln_m", "ct_m", "st_m", "zp_m", "country_m"]
    for column in same:
        assert out[column].iloc[0] == out[column].iloc[1], column
    assert out["em_m"].iloc[0] != out["em_m"].iloc[1]  # Meta keeps dots and +tag


def test_hash_identifiers_unusable_values_are_na() -> None:
    out = hash_identifiers(_people(), "US")
    unusable = out.iloc[2]
    for column in (*HASHED_COLUMNS, *CLEAR_COLUMNS):
        assert pd.isna(unusable[column]), column
    missing = out.iloc[3]
    # a blank country falls back to the clinic's region; everything else stays missing
    assert missing["country_code"] == "US"
    assert missing["country_m"] == sha256_hex("us")
    for column in (*HASHED_COLUMNS, "postal_code"):
        if column != "country_m":
            assert pd.isna(missing[column]), column


def test_hash_identifiers_leads_without_optional_columns() -> None:
    leads = pd.DataFrame(
        {
            "lead_id": ["l1", "l2"],
            "email": ["a.b@example.com", None],
            "zip": ["02134", "2134"],
            "gclid": ["g1", None],
        }
    )
    out = hash_identifiers(leads, "US")
    assert list(out.columns) == ["lead_id", "gclid", *HASHED_COLUMNS, *CLEAR_COLUMNS]
    absent = ["ph_g", "ph_m", "fn_g", "ln_g", "fn_m", "ln_m", "ct_m", "st_m"]
    assert out[absent].isna().all().all()
    assert out["country_code"].tolist() == ["US", "US"]
    assert out["postal_code"].iloc[0] == "02134"
    assert pd.isna(out["postal_code"].iloc[1])
    assert out["em_m"].iloc[0] == sha256_hex("a.b@example.com")


def test_hash_identifiers_uses_row_country_for_zip_and_state() -> None:
    rows = pd.DataFrame({"zip": ["M1 1AE", "M1 1AE"], "state": ["ON", "ON"], "country": ["GB", "US"]})
    out = hash_identifiers(rows, "US")
    assert out["postal_code"].tolist()[0] == "M1 1AE"
    assert pd.isna(out["postal_code"].iloc[1])
    assert out["zp_m"].iloc[0] == sha256_hex("m11ae")
    assert out["st_m"].iloc[0] == sha256_hex("on")
    assert pd.isna(out["st_m"].iloc[1])
    assert out["country_code"].tolist() == ["GB", "US"]


def test_hash_identifiers_empty_frame_and_string_dtype_input() -> None:
    empty = hash_identifiers(pd.DataFrame({"email": pd.Series([], dtype="string")}), "US")
    assert len(empty) == 0
    assert list(empty.columns) == [*HASHED_COLUMNS, *CLEAR_COLUMNS]
    typed = pd.DataFrame({"email": pd.array(["x@y.com", pd.NA], dtype="string")})
    out = hash_identifiers(typed, "US")
    assert out["em_g"].iloc[0] == sha256_hex("x@y.com")
    assert pd.isna(out["em_g"].iloc[1])


def test_hash_identifiers_rejects_a_bad_default_region() -> None:
    with pytest.raises(ValueError, match="default_region"):
        hash_identifiers(pd.DataFrame({"email": ["x@y.com"]}), "Narnia")


def test_hash_identifiers_numeric_columns() -> None:
    rows = pd.DataFrame({"phone": [4155550123, 4155550123], "zip": [94045.0, math.nan]})
    out = hash_identifiers(rows, "US")
    assert out["ph_g"].tolist() == [sha256_hex("+14155550123")] * 2
    assert out["postal_code"].iloc[0] == "94045"
    assert pd.isna(out["postal_code"].iloc[1])


def test_phone_shortcut_matches_the_library_on_many_numbers() -> None:
    numbers = np.random.default_rng(20260101).integers(2_000_000_000, 10_000_000_000, 3000)
    for number in numbers:
        text = str(number)
        assert normalize_phone_e164(text, "US") == _library_e164(text, "US"), "mismatch"


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        pytest.param(np.int64(94045), "94045", id="numpy-int"),
        pytest.param(np.float32(94045), "94045", id="numpy-float32"),
        pytest.param(94045.5, None, id="fraction"),
        pytest.param(float("inf"), None, id="inf"),
        pytest.param(10**5000, None, id="huge-int"),
        pytest.param(b"94045", None, id="bytes"),
    ],
)
def test_number_cells(raw: object, text: str | None) -> None:
    assert normalize_zip(raw, "US") == text


def test_hash_identifiers_parses_each_distinct_phone_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    parse = phonenumbers.parse

    def counting_parse(*args: Any, **kwargs: Any) -> Any:
        calls.append("parse")
        return parse(*args, **kwargs)

    monkeypatch.setattr(phonenumbers, "parse", counting_parse)
    phones = ["+44 20 7946 0018", "tel:+1-415-555-0123", "(415) 555-0123", "4155550123"] * 500
    out = hash_identifiers(pd.DataFrame({"phone": phones}), "US")
    assert out["ph_g"].notna().all()
    # the two plain US numbers need no parser at all; the other two are parsed once each
    assert len(calls) == 2


# pieces for texts that probe the bulk email and phone paths: whitespace that str.strip() and
# re's \s take (\x0b, \x1c), whitespace they take only outside ASCII (\xa0, \u2003), a dotted
# capital I whose lowercase grows, a non-ASCII digit, Gmail domains and NANP-shaped digit runs
_EMAIL_PIECES = [
    "a", "B", "Jo.e", "+tag", "@", ".", " ", "\t", "\x0b", "\x1c", "\xa0", "\u2003", "é", "İ",
    "gmail.com", "GoogleMail.com", "example.org", "x.", "-",
]  # fmt: skip
_PHONE_PIECES = [
    "+", "+1", "1", "0", "415", "555", "0123", "268", "876", "(", ")", " ", ".", "-", "x", "\xa0",
    "\u0663", "+44 20 7946 0018", "tel:", "2", "3",
]  # fmt: skip


def _texts(pieces: list[str]) -> st.SearchStrategy[list[str | None]]:
    text = st.lists(st.sampled_from(pieces), max_size=8).map("".join)
    return st.lists(st.one_of(st.none(), text), min_size=1, max_size=10)


def _hash_or_none(text: str | None) -> str | None:
    return None if text is None else sha256_hex(text)


def _cells(column: pd.Series) -> list[str | None]:
    return [None if pd.isna(v) else v for v in column]


@pytest.mark.parametrize("dtype", ["string[pyarrow]", object])
@settings(max_examples=200, deadline=None)
@given(_texts(_EMAIL_PIECES))
@example(
    [" Jane.Doe+Promo@GMail.com\x1c", "a@b.c", "a@.b", "a@b.", "İ@gmail.com", "x\xa0@y.z", "+@gmail.com"]
)
def test_bulk_emails_match_the_scalar_normalizers(dtype: object, texts: list[str | None]) -> None:
    out = hash_identifiers(pd.DataFrame({"email": pd.array(texts * 2, dtype=dtype)}), "US")
    assert _cells(out["em_m"]) == [_hash_or_none(normalize_email_meta(t)) for t in texts * 2]
    assert _cells(out["em_g"]) == [_hash_or_none(normalize_email_google(t)) for t in texts * 2]


@pytest.mark.parametrize("dtype", ["string[pyarrow]", object])
@settings(max_examples=200, deadline=None)
@given(_texts(_PHONE_PIECES), st.sampled_from(["US", "CA", "JM", "GB", "DE"]))
@example(
    ["(415) 555-0123", "+1 415 555 0123", "14155550123", "0155550123", " +14155550123", "+4155550123"], "US"
)
@example(["+1 (268) 464-1234", "268 464 1234", "+123456789", "1 415 555 0123", "+44 20 7946 0018"], "GB")
def test_bulk_phones_match_the_scalar_normalizers(
    dtype: object, texts: list[str | None], region: str
) -> None:
    out = hash_identifiers(pd.DataFrame({"phone": pd.array(texts * 2, dtype=dtype)}), region)
    assert _cells(out["ph_g"]) == [_hash_or_none(normalize_phone_e164(t, region)) for t in texts * 2]
    assert _cells(out["ph_m"]) == [_hash_or_none(normalize_phone_meta(t, region)) for t in texts * 2]


def test_arrow_and_object_columns_hash_alike() -> None:
    people = (
        _people()
        .drop(columns=["phone"])
        .assign(phone=["(415) 555-0123", "+1 415 555 0123", "555-0100", None])
    )
    typed = people.astype({c: "string[pyarrow]" for c in RAW_COLUMNS})
    expected = hash_identifiers(people, "US")
    actual = hash_identifiers(typed, "US")
    pd.testing.assert_frame_equal(actual, expected)
    for column in (*HASHED_COLUMNS, *CLEAR_COLUMNS):  # the same categories, in the same order
        assert actual[column].cat.categories.tolist() == expected[column].cat.categories.tolist()


def test_click_ids_not_shaped_like_one_are_left_out() -> None:
    gclid = "Cj0KCQjw_0123456789abcdefABCDEF-BwE"
    fbc = "fb.1.1777100000000.IwAR2F4-dbP0l7Mn1IawQQGCINEz7PYX"
    frame = pd.DataFrame({
        "gclid": [gclid, "jane.doe134", None, "Cj0KCQjw.0123456789abcdef"],
        "fbclid": [None, "4155550123", "IwAR2F4-dbP0l7Mn1IawQQGCINEz7PYX", None],
        "fbc": [fbc, "fb.1.1792702786000.4155550135", None, fbc + ".AQ"],  # Meta's appendix
        "fbp": ["fb.1.1777100000000.1116446470", "4155550123", None, None],
    })  # fmt: skip
    out, blanked = usable_click_ids(frame)
    assert blanked == 5
    assert out["gclid"].tolist() == [gclid, None, None, None]
    assert out["fbclid"].tolist() == [None, None, "IwAR2F4-dbP0l7Mn1IawQQGCINEz7PYX", None]
    assert out["fbc"].tolist() == [fbc, None, None, fbc + ".AQ"]
    assert out["fbp"].tolist() == ["fb.1.1777100000000.1116446470", None, None, None]
    assert frame["gclid"][1] == "jane.doe134"  # the input is not changed


WORD_SLUGS = [
    "CANARY_SERVICE_Botox_hyperhidrosis",
    "semaglutide_weight_loss_nov",
    "Jane_A_Doe_botox_lip_filler",
    "mary-o-connor-lip-filler-2026",
    "JaneDoeBotoxHyperhidrosis",
    "BOTOXTreatment_janeDoe22",
    "appt-000123-patient-000456",
    "12345678901234567890123",
]
CLICK_TOKENS = [
    "IwAR2F4-dbP0l7Mn1IawQQGCINEz7PYXQvwjNwB_qa2ofrHyiLjcbCRxTDMgk",  # Meta's documented fbclid
    "Cj0KCQiA8fW9BhC8ARIsACwHqYrLrIOUSaSLDtI1xZgxOP7R1d9rS6gcL8Cml3-VyD0jpjsMcBpCj9saAgGsEALw_wcB",
    "Cj0abc_testclickid0000",
]


def test_click_ids_that_read_as_words_are_left_out() -> None:
    """A slug has a click ID's characters and length, but it is text (a campaign, a treatment,
    a name) and would leave in clear; extract (RE2) and the gate's pattern agree on each."""
    fbclid = CLICK_TOKENS[0]
    fbc = [f"fb.1.1793552400000.{v}" for v in (*WORD_SLUGS, fbclid)]
    fbc += [f"fb.1.1793552400000.{fbclid}.{a}" for a in ("AQ", "Bg", "AQEBAQ8Y", "Botox", "JaneDoe")]
    fbp = [f"fb.1.1754670832319.4717288100{a}" for a in ("", ".AQ", ".AQEAAQAB", ".Jane_Doe_Botox")]
    frame = pd.DataFrame({"gclid": WORD_SLUGS + CLICK_TOKENS})
    out, blanked = usable_click_ids(frame)
    assert out["gclid"].tolist() == [None] * len(WORD_SLUGS) + CLICK_TOKENS
    assert blanked == len(WORD_SLUGS)
    kept_fbc = usable_click_ids(pd.DataFrame({"fbc": fbc}))[0]["fbc"].notna().tolist()
    assert kept_fbc == [False] * len(WORD_SLUGS) + [True, True, True, True, False, False]
    kept_fbp = usable_click_ids(pd.DataFrame({"fbp": fbp}))[0]["fbp"].notna().tolist()
    assert kept_fbp == [True, True, True, False]
    for shape, values, kept in ((CLICK_ID, WORD_SLUGS + CLICK_TOKENS, out["gclid"].notna()),
                                (FBC, fbc, kept_fbc), (FBP, fbp, kept_fbp)):  # fmt: skip
        assert [bool(shape.fullmatch(v)) for v in values] == list(kept)


def test_random_click_ids_of_real_length_are_kept() -> None:
    """Real click IDs are 60 to 100 random URL-safe base64 characters: none of them reads as words."""
    alphabet = np.array(list(string.ascii_letters + string.digits + "_-"))
    rng = np.random.default_rng(7)
    tokens = ["".join(row) for row in rng.choice(alphabet, size=(20_000, 60))]
    _, blanked = usable_click_ids(pd.DataFrame({"gclid": tokens, "fbclid": tokens}))
    assert blanked == 0
    assert all(CLICK_ID.fullmatch(t) for t in tokens[:2_000])
