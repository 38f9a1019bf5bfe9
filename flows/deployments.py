"""``muontrack serve``: the flows as Prefect deployments with schedules.

Schedules need a real Prefect server (the ephemeral one lives only as long as one command). Start one
first, point the CLI at it, then serve::

    prefect server start &                                   # UI and API on http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    muontrack serve

``serve`` keeps running, executing scheduled and manually triggered runs (``prefect deployment run
'end-to-end/on-demand-test'``).
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import MuontrackError

#: where scheduled runs write, overridable with MUONTRACK_SERVE_DIR
DEFAULT_SERVE_DIR = Path("muontrack-scheduled")


def build_deployments(base: Path = DEFAULT_SERVE_DIR) -> list:
    """The deployments served by ``muontrack serve`` (also used by tests to check their schedules)."""
    from flows.end_to_end import end_to_end, simulate_flow

    return [
        simulate_flow.to_deployment(
            name="nightly-regeneration",
            cron="0 2 * * *",
            parameters={"out": str(base / "nightly-data"), "events": 200_000, "seed": 0},
            description="Regenerate the 200k-event default dataset every night at 02:00 (resumes if interrupted).",
        ),
        end_to_end.to_deployment(
            name="weekly-cpu",
            cron="0 3 * * 0",
            parameters={"out": str(base / "weekly-cpu"), "preset": "cpu"},
            description="The whole cpu-preset job every Sunday at 03:00; caches reuse unchanged steps.",
        ),
        end_to_end.to_deployment(
            name="on-demand-test",
            parameters={"out": str(base / "on-demand-test"), "preset": "test"},
            description="The tiny test-preset job, to check a server and its workers end to end.",
        ),
    ]


def serve_deployments() -> None:
    import prefect.settings
    from prefect import serve

    if not prefect.settings.PREFECT_API_URL.value():
        raise MuontrackError(
            "schedules need a running Prefect server: start `prefect server start` and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api first"
        )
    base = Path(os.environ.get("MUONTRACK_SERVE_DIR", DEFAULT_SERVE_DIR))
    serve(*build_deployments(base))
