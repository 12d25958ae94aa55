"""Process-wide settings shared by the CLI and the Airflow tasks."""

from __future__ import annotations

import logging
import os

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


def private_files() -> None:
    """New files and folders readable by this process's user only (0600/0700).

    The staging database, the hashed extracts and the outbox hold pseudonymous identifiers,
    click IDs and the clinic's own record IDs: under the common umask 022 they were readable
    by every account on the machine.
    """
    os.umask(0o077)
