"""Process-wide settings shared by the CLI and the Airflow tasks."""

from __future__ import annotations

import logging

# third-party clients log request bodies (hashes, click IDs) or URLs (tokens) at DEBUG/INFO;
# a run's own logs carry counts only, so these are held at WARNING wherever a run starts
NOISY_LOGGERS = (
    "google.ads",
    "googleapiclient",
    "urllib3",
    "facebook_business",
    "grpc",
    "great_expectations",
    "sqlalchemy",
)


def quiet_third_party_loggers() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
