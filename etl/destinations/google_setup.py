"""Wiring of the Google destinations: credentials from the environment, ``doctor``, factory.

Contract: issue #3 (items 1 and 4) and ``docs/google.md`` (which lists the variables). Secrets
come from environment variables (in Airflow, connections mapped onto the same names by
``etl.airflow_support``); they are handed to the
SDKs and never logged, echoed in an error, or written anywhere by us: every message here names
a variable, never its value.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from etl.config import ClinicConfig, GoogleAds
from etl.destinations.base import AudienceDestination, ConversionDestination
from etl.destinations.google_common import RetryPolicy
from etl.errors import ConfigError

if TYPE_CHECKING:
    from etl.sandbox.google import GoogleSandbox

DEVELOPER_TOKEN = "GOOGLE_ADS_DEVELOPER_TOKEN"
LOGIN_CUSTOMER_ID = "GOOGLE_ADS_LOGIN_CUSTOMER_ID"
ADS_KEY_FILE = "GOOGLE_ADS_JSON_KEY_FILE_PATH"
ADS_IMPERSONATED_EMAIL = "GOOGLE_ADS_IMPERSONATED_EMAIL"
ADS_OAUTH = ("GOOGLE_ADS_CLIENT_ID", "GOOGLE_ADS_CLIENT_SECRET", "GOOGLE_ADS_REFRESH_TOKEN")
DM_KEY_FILE = "GOOGLE_APPLICATION_CREDENTIALS"
DM_OAUTH = ("DATAMANAGER_CLIENT_ID", "DATAMANAGER_CLIENT_SECRET", "DATAMANAGER_REFRESH_TOKEN")
TOKEN_URI = "https://oauth2.googleapis.com/token"
SANDBOX_POLL_INTERVAL = 0.05


class _RedactFaultMessage(logging.Filter):
    """Keep the google-ads fault summary line, minus its free-text FaultMessage."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "FaultMessage:" in message:
            record.msg = message.split("FaultMessage:", 1)[0] + "FaultMessage: (redacted)"
            record.args = None
        return True


_QUIETED = False


def quiet_sdk_loggers() -> None:
    """Stop the Google SDKs from logging request bodies, identifiers, click ids or tokens.

    google-ads logs whole requests at INFO/DEBUG and a fault line with the server's message at
    WARNING; the Data Manager GAPIC client logs request payloads at DEBUG. Pinning both loggers
    to WARNING keeps that out even when the root logger runs at DEBUG; the filter strips the
    fault message (free text from the server) from the one line that remains.
    """
    global _QUIETED
    if _QUIETED:
        return
    _QUIETED = True
    ads = logging.getLogger("google.ads.googleads.client")
    ads.setLevel(logging.WARNING)
    ads.addFilter(_RedactFaultMessage())
    for name in ("google.ads.googleads", "google.ads.datamanager_v1", "google.api_core"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _get(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def _key_file_problem(environ: Mapping[str, str], name: str, types: tuple[str, ...]) -> str | None:
    path = Path(_get(environ, name))
    if not path.is_file():
        return f"invalid {name} (file not found)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"invalid {name} (not a JSON key file)"
    if not isinstance(data, dict) or data.get("type") not in types:
        return f"invalid {name} (not a {' or '.join(types)} key file)"
    return None


def _oauth_state(environ: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    """None when no OAuth variable is set, "ok" when all are, else what is missing."""
    present = [n for n in names if _get(environ, n)]
    if not present:
        return None
    missing = [n for n in names if n not in present]
    return "ok" if not missing else "missing " + ", ".join(missing)


def _credential_check(
    environ: Mapping[str, str], key_file: str, oauth: tuple[str, ...], types: tuple[str, ...]
) -> str:
    if _get(environ, key_file):
        problem = _key_file_problem(environ, key_file, types)
        return problem or "ok (service account key file)"
    state = _oauth_state(environ, oauth)
    if state is None:
        return f"missing {key_file} or {', '.join(oauth)}"
    return "ok (OAuth refresh token)" if state == "ok" else state


def _login_customer_id(google: GoogleAds, environ: Mapping[str, str]) -> str | None:
    value = google.login_customer_id or _get(environ, LOGIN_CUSTOMER_ID).replace("-", "")
    return value or None


def doctor_google(config: ClinicConfig, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """Say what is missing or wrong for the clinic's Google path, without any secret value.

    Returns:
        (check name, "ok ..." | "missing X" | "invalid X ..." ) pairs, in display order.
    """
    google = config.google_ads
    if google is None:
        return [("google_ads config", "missing google_ads section")]
    checks = [("google_ads config", "ok"), ("google_ads.api", f"ok ({google.api})")]
    if not google.suppression_enabled:
        checks.append(("google_ads.suppression_user_list", "ok (suppression disabled)"))
    elif google.suppression_user_list is None:
        checks.append(("google_ads.suppression_user_list", "missing google_ads.suppression_user_list"))
    else:
        checks.append(("google_ads.suppression_user_list", "ok"))
    env_login = _get(environ, LOGIN_CUSTOMER_ID).replace("-", "")
    if env_login and not re.fullmatch(r"\d{10}", env_login):
        checks.append((LOGIN_CUSTOMER_ID, f"invalid {LOGIN_CUSTOMER_ID} (expected 10 digits)"))
    else:
        login_set = bool(env_login or google.login_customer_id)
        checks.append((LOGIN_CUSTOMER_ID, "ok" if login_set else "ok (not set; optional)"))
    if google.api == "google_ads":
        checks.extend(_ads_checks(environ))
    else:
        creds = _credential_check(environ, DM_KEY_FILE, DM_OAUTH, ("service_account", "authorized_user"))
        checks.append(("data_manager credentials", creds))
    return checks


def resolve_ads_settings(google: GoogleAds, environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``GoogleAdsClient.load_from_dict`` settings for a live run.

    Raises:
        ConfigError: naming every missing or invalid variable (never a value).
    """
    problems = [status for name, status in _ads_checks(environ) if not status.startswith("ok")]
    if problems:
        raise ConfigError("Google Ads API credentials: " + "; ".join(problems))
    settings: dict[str, Any] = {"developer_token": _get(environ, DEVELOPER_TOKEN)}
    login = _login_customer_id(google, environ)
    if login:
        settings["login_customer_id"] = login
    if _get(environ, ADS_KEY_FILE):
        settings["json_key_file_path"] = _get(environ, ADS_KEY_FILE)
        if _get(environ, ADS_IMPERSONATED_EMAIL):
            settings["impersonated_email"] = _get(environ, ADS_IMPERSONATED_EMAIL)
    else:
        client_id, secret, refresh = (_get(environ, n) for n in ADS_OAUTH)
        settings.update(client_id=client_id, client_secret=secret, refresh_token=refresh)
    return settings


def _ads_checks(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    token = _get(environ, DEVELOPER_TOKEN)
    return [
        (DEVELOPER_TOKEN, "ok" if token else f"missing {DEVELOPER_TOKEN}"),
        (
            "google_ads credentials",
            _credential_check(environ, ADS_KEY_FILE, ADS_OAUTH, ("service_account",)),
        ),
    ]


def resolve_dm_credentials(environ: Mapping[str, str]) -> Any:
    """google-auth credentials with the Data Manager scope, from a key file or OAuth triple.

    Raises:
        ConfigError: naming the missing or invalid variables (never a value).
    """
    from etl.destinations.google_datamanager import SCOPE

    status = _credential_check(environ, DM_KEY_FILE, DM_OAUTH, ("service_account", "authorized_user"))
    if not status.startswith("ok"):
        raise ConfigError(f"Data Manager API credentials: {status}")
    if _get(environ, DM_KEY_FILE):
        import google.auth

        credentials, _ = google.auth.load_credentials_from_file(_get(environ, DM_KEY_FILE), scopes=[SCOPE])
        return credentials
    from google.oauth2.credentials import Credentials

    client_id, secret, refresh = (_get(environ, n) for n in DM_OAUTH)
    return Credentials(
        None,
        refresh_token=refresh,
        client_id=client_id,
        client_secret=secret,
        token_uri=TOKEN_URI,
        scopes=[SCOPE],
    )


def make_google_destinations(
    config: ClinicConfig,
    *,
    target: Literal["live", "sandbox"],
    sandbox: GoogleSandbox | None = None,
    retry_wait: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[ConversionDestination, AudienceDestination]:
    """The clinic's Google conversion and Customer Match destinations.

    ``config.google_ads.api`` picks the adapter pair (``data_manager``, the default, or
    ``google_ads``); ``target`` picks real Google (credentials from ``environ``, default
    ``os.environ``) or a started ``GoogleSandbox``. ``retry_wait`` is the first backoff delay
    in seconds (tests pass 0).

    Raises:
        ConfigError: no google_ads section, no sandbox for ``target="sandbox"``, or missing
            credentials for ``target="live"``.
    """
    from etl.destinations.google_ads import (
        GoogleAdsConversions,
        build_live_ads_client,
        build_sandbox_ads_client,
    )
    from etl.destinations.google_ads_audience import GoogleAdsCustomerMatch
    from etl.destinations.google_datamanager import (
        DataManagerConversions,
        build_live_dm_client,
        build_sandbox_dm_client,
    )
    from etl.destinations.google_datamanager_audience import DataManagerCustomerMatch

    google = config.google_ads
    if google is None:
        raise ConfigError("the clinic config has no google_ads section")
    env = os.environ if environ is None else environ
    if target == "sandbox" and sandbox is None:
        raise ConfigError("target 'sandbox' needs a started GoogleSandbox")
    if target not in ("live", "sandbox"):
        raise ConfigError("target must be 'live' or 'sandbox'")
    use_sandbox = sandbox if target == "sandbox" else None
    policy = RetryPolicy() if retry_wait is None else RetryPolicy(wait=retry_wait)
    login = _login_customer_id(google, env)
    if google.api == "google_ads":
        if use_sandbox is not None:
            client = build_sandbox_ads_client(use_sandbox, login)
        else:
            client = build_live_ads_client(resolve_ads_settings(google, env), google.customer_id)
        return (
            GoogleAdsConversions(client, google.customer_id, policy=policy),
            GoogleAdsCustomerMatch(
                client,
                google.customer_id,
                google.suppression_user_list,
                enabled=google.suppression_enabled,
                consented=config.rules.suppression_requires_consent,
                policy=policy,
                poll_interval=SANDBOX_POLL_INTERVAL if use_sandbox is not None else 10.0,
            ),
        )
    if use_sandbox is not None:
        dm_client = build_sandbox_dm_client(use_sandbox)
    else:
        dm_client = build_live_dm_client(resolve_dm_credentials(env))
    return (
        DataManagerConversions(dm_client, google.customer_id, login, policy),
        DataManagerCustomerMatch(
            dm_client,
            google.customer_id,
            login,
            policy,
            user_list=google.suppression_user_list,
            enabled=google.suppression_enabled,
            consented=config.rules.suppression_requires_consent,
        ),
    )
