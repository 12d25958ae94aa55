"""Google wiring: member keys, the doctor check, credentials from the environment, the factory.

No network: live clients are only built (google-auth fetches tokens lazily, on first call).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from etl.config import ClinicConfig
from etl.destinations.google_common import doctor_google, make_google_destinations, member_key
from etl.destinations.google_datamanager import DataManagerConversions
from etl.destinations.google_datamanager_audience import DataManagerCustomerMatch
from etl.destinations.google_setup import resolve_ads_settings
from etl.errors import ConfigError, DestinationConfigError

SECRET = "s3cr3t-VALUE-never-printed"
ADS_OAUTH = {
    "GOOGLE_ADS_DEVELOPER_TOKEN": SECRET + "-dev",
    "GOOGLE_ADS_CLIENT_ID": SECRET + "-id",
    "GOOGLE_ADS_CLIENT_SECRET": SECRET + "-secret",
    "GOOGLE_ADS_REFRESH_TOKEN": SECRET + "-refresh",
}
DM_OAUTH = {
    "DATAMANAGER_CLIENT_ID": SECRET + "-id",
    "DATAMANAGER_CLIENT_SECRET": SECRET + "-secret",
    "DATAMANAGER_REFRESH_TOKEN": SECRET + "-refresh",
}


def service_account_file(folder: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path = folder / "sa.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "demo",
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": "uploader@demo.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    return path


def test_member_key_is_canonical_sha256_of_the_identifiers():
    row = {
        "operation": "create",
        "user_identifiers": [{"address_info": {"postal_code": "94045", "country_code": "US"}}],
    }
    reordered = {
        "user_identifiers": [{"address_info": {"country_code": "US", "postal_code": "94045"}}],
        "operation": "remove",
    }
    assert member_key(row) == member_key(reordered)
    assert len(member_key(row)) == 64 and int(member_key(row), 16) >= 0
    import hashlib

    canonical = '[{"address_info":{"country_code":"US","postal_code":"94045"}}]'
    assert member_key(row) == hashlib.sha256(canonical.encode()).hexdigest()


def test_doctor_reports_missing_without_values(google_config):
    checks = dict(doctor_google(google_config("google_ads"), {"GOOGLE_ADS_CLIENT_ID": SECRET}))
    assert checks["GOOGLE_ADS_DEVELOPER_TOKEN"] == "missing GOOGLE_ADS_DEVELOPER_TOKEN"
    assert checks["google_ads credentials"] == "missing GOOGLE_ADS_CLIENT_SECRET, GOOGLE_ADS_REFRESH_TOKEN"
    assert checks["google_ads.suppression_user_list"] == "ok"
    dm = dict(doctor_google(google_config(), {}))
    assert dm["data_manager credentials"].startswith("missing GOOGLE_APPLICATION_CREDENTIALS or DATAMANAGER_")
    assert "GOOGLE_ADS_DEVELOPER_TOKEN" not in dm  # no developer token on the Data Manager path


def test_doctor_says_ok_and_never_prints_secrets(google_config, tmp_path):
    key = service_account_file(tmp_path)
    env = {**ADS_OAUTH, "GOOGLE_ADS_LOGIN_CUSTOMER_ID": "123-456-7890"}
    checks = doctor_google(google_config("google_ads"), env)
    assert all(status.startswith("ok") for _, status in checks), checks
    dm_checks = doctor_google(google_config(), {"GOOGLE_APPLICATION_CREDENTIALS": str(key)})
    assert dict(dm_checks)["data_manager credentials"] == "ok (service account key file)"
    assert SECRET not in repr(checks) + repr(dm_checks) and str(key) not in repr(dm_checks)


def test_doctor_flags_invalid_values(google_config, tmp_path):
    not_json = tmp_path / "key.json"
    not_json.write_text("-----BEGIN PRIVATE KEY-----")
    checks = dict(
        doctor_google(
            google_config("google_ads", suppression_user_list=None),
            {
                "GOOGLE_ADS_DEVELOPER_TOKEN": "t",
                "GOOGLE_ADS_JSON_KEY_FILE_PATH": str(not_json),
                "GOOGLE_ADS_LOGIN_CUSTOMER_ID": "12345",
            },
        )
    )
    assert checks["google_ads credentials"] == "invalid GOOGLE_ADS_JSON_KEY_FILE_PATH (not a JSON key file)"
    assert checks["GOOGLE_ADS_LOGIN_CUSTOMER_ID"].startswith("invalid GOOGLE_ADS_LOGIN_CUSTOMER_ID")
    assert checks["google_ads.suppression_user_list"] == "missing google_ads.suppression_user_list"
    gone = dict(doctor_google(google_config(), {"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "no")}))
    assert gone["data_manager credentials"] == "invalid GOOGLE_APPLICATION_CREDENTIALS (file not found)"
    no_google = ClinicConfig.model_validate(
        {
            "clinic_id": "c",
            "timezone": "UTC",
            "sources": {"appointments": {"path": "a"}, "leads": {"path": "l"}},
        }
    )
    assert doctor_google(no_google, {}) == [("google_ads config", "missing google_ads section")]


def test_factory_builds_live_data_manager_adapters_from_oauth(google_config):
    conversions, audience = make_google_destinations(google_config(), target="live", environ=DM_OAUTH)
    assert isinstance(conversions, DataManagerConversions)
    assert isinstance(audience, DataManagerCustomerMatch)


def test_google_ads_settings_come_from_the_environment(google_config, tmp_path):
    # building a live GoogleAdsClient refreshes a token over the network, so stop at the settings
    settings = resolve_ads_settings(google_config("google_ads").google_ads, ADS_OAUTH)
    assert settings == {
        "developer_token": ADS_OAUTH["GOOGLE_ADS_DEVELOPER_TOKEN"],
        "client_id": ADS_OAUTH["GOOGLE_ADS_CLIENT_ID"],
        "client_secret": ADS_OAUTH["GOOGLE_ADS_CLIENT_SECRET"],
        "refresh_token": ADS_OAUTH["GOOGLE_ADS_REFRESH_TOKEN"],
    }
    key = service_account_file(tmp_path)
    env = {
        "GOOGLE_ADS_DEVELOPER_TOKEN": "t",
        "GOOGLE_ADS_JSON_KEY_FILE_PATH": str(key),
        "GOOGLE_ADS_LOGIN_CUSTOMER_ID": "111-222-3333",
    }
    settings = resolve_ads_settings(google_config("google_ads").google_ads, env)
    assert settings == {
        "developer_token": "t",
        "json_key_file_path": str(key),
        "login_customer_id": "1112223333",
    }


def test_live_google_ads_client_turns_a_refused_refresh_into_a_config_error(google_config, monkeypatch):
    from google.auth import exceptions as auth_exceptions
    from google.oauth2 import credentials

    def refuse(self, request):
        raise auth_exceptions.RefreshError("invalid_grant: " + SECRET)

    monkeypatch.setattr(credentials.Credentials, "refresh", refuse)
    with pytest.raises(DestinationConfigError) as caught:
        make_google_destinations(google_config("google_ads"), target="live", environ=ADS_OAUTH)
    assert "OAUTH_REFRESH_FAILED" in str(caught.value) and SECRET not in str(caught.value)


def test_factory_builds_live_data_manager_from_a_key_file(google_config, tmp_path):
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(service_account_file(tmp_path))}
    conversions, _ = make_google_destinations(google_config(), target="live", environ=env)
    assert isinstance(conversions, DataManagerConversions)


@pytest.mark.parametrize("api", ["google_ads", "data_manager"])
def test_factory_refuses_missing_credentials_naming_variables(api, google_config):
    with pytest.raises(ConfigError) as caught:
        make_google_destinations(google_config(api), target="live", environ={"GOOGLE_ADS_CLIENT_ID": SECRET})
    message = str(caught.value)
    assert SECRET not in message
    assert (
        "GOOGLE_ADS_DEVELOPER_TOKEN" if api == "google_ads" else "GOOGLE_APPLICATION_CREDENTIALS"
    ) in message


def test_factory_needs_a_section_and_a_sandbox(google_config):
    with pytest.raises(ConfigError, match="sandbox"):
        make_google_destinations(google_config(), target="sandbox")
    no_google = ClinicConfig.model_validate(
        {
            "clinic_id": "c",
            "timezone": "UTC",
            "sources": {"appointments": {"path": "a"}, "leads": {"path": "l"}},
        }
    )
    with pytest.raises(ConfigError, match="google_ads"):
        make_google_destinations(no_google, target="live", environ={})
