"""One switch picks the adapter set: local protocol-true sandboxes, or the live platforms.

``--target sandbox`` starts the in-process Google gRPC sandbox and Meta Graph sandbox for the
duration of the run and points the real SDK clients at them; ``--target live`` builds the same
adapters with credentials from the environment. Either way the pipeline sees only the
``ConversionDestination``/``AudienceDestination`` interfaces.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from etl.config import ClinicConfig
from etl.destinations.base import AudienceDestination, ConversionDestination


@dataclass
class Destinations:
    conversions: dict[str, ConversionDestination] = field(default_factory=dict)
    audiences: dict[str, AudienceDestination] = field(default_factory=dict)
    sandboxes: dict[str, Any] = field(default_factory=dict)


@contextmanager
def open_destinations(
    config: ClinicConfig,
    target: Literal["sandbox", "live"],
    *,
    now: datetime,
    test_event_code: str | None = None,
    retry_wait: float | None = None,
    sandboxes: dict[str, Any] | None = None,
    only: Literal["google", "meta"] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Iterator[Destinations]:
    """Build the clinic's destinations; sandboxes started here are stopped on exit.

    Args:
        now: when Meta judges event age: the run's end for the sandbox (its clock), and for
            live sends the later of the run's end and the upload's own time (``etl.tasks``).
        sandboxes: already started sandboxes to reuse, keyed "google" / "meta".
        only: build one platform's adapters (an upload task needs only its own).
        environ: where live credentials are read (default ``os.environ``); the DAG passes a
            mapping built from Airflow connections instead of exporting them.
    """
    out = Destinations()
    with ExitStack() as stack:
        if config.google_ads is not None and only in (None, "google"):
            from etl.destinations.google_setup import make_google_destinations

            google_sandbox = None
            if target == "sandbox":
                google_sandbox = (sandboxes or {}).get("google")
                if google_sandbox is None:
                    from etl.sandbox.google import GoogleSandbox

                    google_sandbox = stack.enter_context(GoogleSandbox())
                out.sandboxes["google"] = google_sandbox
            conv, aud = make_google_destinations(
                config,
                target=target,
                sandbox=google_sandbox,
                retry_wait=retry_wait,
                environ=environ,
            )
            out.conversions[conv.name] = conv
            if config.mirrors_a_list("google_ads"):
                out.audiences[aud.name] = aud
        if config.meta is not None and only in (None, "meta"):
            from etl.destinations.meta import make_meta_destinations

            meta_sandbox = None
            if target == "sandbox":
                meta_sandbox = (sandboxes or {}).get("meta")
                if meta_sandbox is None:
                    from etl.sandbox.meta import MetaSandbox

                    meta_sandbox = stack.enter_context(MetaSandbox(now=now))
                out.sandboxes["meta"] = meta_sandbox
            conv, aud = make_meta_destinations(
                config,
                target=target,
                now=now,
                sandbox=meta_sandbox,
                test_event_code=test_event_code,
                retry_wait=retry_wait,
                environ=environ,
            )
            out.conversions[conv.name] = conv
            if config.mirrors_a_list("meta"):
                out.audiences[aud.name] = aud
        yield out


@contextmanager
def started_sandboxes(config: ClinicConfig, *, now: datetime) -> Iterator[dict[str, Any]]:
    """Start the sandboxes a clinic needs once, for several steps in one process (CLI, tests)."""
    with ExitStack() as stack:
        started: dict[str, Any] = {}
        if config.google_ads is not None:
            from etl.sandbox.google import GoogleSandbox

            started["google"] = stack.enter_context(GoogleSandbox())
        if config.meta is not None:
            from etl.sandbox.meta import MetaSandbox

            started["meta"] = stack.enter_context(MetaSandbox(now=now))
        yield started
