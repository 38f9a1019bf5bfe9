"""``muontrack serve``: the flows as Prefect deployments with schedules.

Schedules need a real Prefect server (the ephemeral one lives only as long as one command). Start one
first, point the CLI at it, then serve; a ``PREFECT_HOME`` of its own keeps the server's database and
settings out of the user's global Prefect profile::

    export PREFECT_HOME=~/muontrack-prefect                  # the server apart from ~/.prefect
    prefect server start &                                   # UI and API on http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    muontrack serve

``serve`` keeps running, executing scheduled and manually triggered runs (``prefect deployment run
'end-to-end/on-demand-test'``). tests/test_schedules.py runs the nightly deployment against a real server.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from prefect import flow

from pipeline.errors import ConfigError, MuontrackError

#: where scheduled runs write, overridable with MUONTRACK_SERVE_DIR
DEFAULT_SERVE_DIR = Path("muontrack-scheduled")
#: events of the nightly dataset (about 190 MB on disk)
NIGHTLY_EVENTS = 200_000


def nightly_date(night: str | None = None) -> datetime.date:
    """The night a nightly run simulates: ``night`` (YYYY-MM-DD) when given, else the UTC date of the run's
    scheduled start (of its creation for a run started by hand; today outside a flow run)."""
    if night:
        try:
            return datetime.date.fromisoformat(night)
        except ValueError:
            raise ConfigError(f"night {night!r} is not a date (YYYY-MM-DD)") from None
    from prefect.runtime import flow_run

    return flow_run.scheduled_start_time.astimezone(datetime.UTC).date()


def nightly_seed(night: datetime.date) -> int:
    """The seed of a night's dataset: its date as the integer YYYYMMDD."""
    return int(night.strftime("%Y%m%d"))


def _nightly_run_name() -> str:
    from prefect.runtime import flow_run

    night = flow_run.parameters.get("night")
    try:
        return f"nightly-{nightly_date(night).isoformat()}"
    except ConfigError:
        return f"nightly-{night}"  # the flow itself reports the bad date


@flow(name="nightly-simulate", flow_run_name=_nightly_run_name, log_prints=True)
def nightly_simulate(base: str, events: int = NIGHTLY_EVENTS, night: str | None = None) -> dict:
    """One new, independent dataset per night: ``base/YYYY-MM-DD`` with seed YYYYMMDD (:func:`nightly_date`).

    Every night adds statistics instead of regenerating the same events; a night's dataset is reproducible
    from its date, and a retried or repeated run of the same night resumes (or finds complete) the same
    folder. ``night``: simulate that night's dataset again (a lost folder, a check of reproducibility)."""
    from flows.end_to_end import simulate_flow

    date = nightly_date(night)
    return simulate_flow(str(Path(base) / date.isoformat()), events, nightly_seed(date))


def build_deployments(
    base: Path = DEFAULT_SERVE_DIR, schedules: dict[str, list] | None = None, nightly_events: int = NIGHTLY_EVENTS
) -> list:
    """The deployments served by ``muontrack serve`` (also used by tests to check their schedules).

    ``schedules``: deployment name -> the prefect.schedules that replace its own (tests/test_schedules.py:
    one that fires seconds after it is registered); ``nightly_events``: the size of each nightly dataset.
    """
    from prefect.schedules import Cron

    from flows.end_to_end import end_to_end

    schedules = schedules or {}
    return [
        nightly_simulate.to_deployment(
            name="nightly-regeneration",
            schedules=schedules.get("nightly-regeneration", [Cron("0 2 * * *", timezone="UTC")]),
            parameters={"base": str(base / "nightly-data"), "events": nightly_events},
            description=(
                f"Every night at 02:00 UTC a new {nightly_events}-event dataset in nightly-data/YYYY-MM-DD, "
                "seed YYYYMMDD (a rerun of the same night resumes it)."
            ),
        ),
        end_to_end.to_deployment(
            name="weekly-cpu",
            schedules=schedules.get("weekly-cpu", [Cron("0 3 * * 0", timezone="UTC")]),
            parameters={"out": str(base / "weekly-cpu"), "preset": "cpu"},
            description="The whole cpu-preset job every Sunday at 03:00 UTC; caches reuse unchanged steps.",
        ),
        end_to_end.to_deployment(
            name="on-demand-test",
            schedules=schedules.get("on-demand-test"),
            parameters={"out": str(base / "on-demand-test"), "preset": "test"},
            description="The tiny test-preset job, to check a server and its workers end to end.",
        ),
    ]


def serve_deployments() -> None:
    """Serve the deployments' flows from this process (``muontrack serve``), with JAX's compilation cache on
    (pipeline.cache.enable_compilation_cache: the flow runs it starts inherit it)."""
    import prefect.settings
    from prefect import serve

    from pipeline.cache import enable_compilation_cache

    enable_compilation_cache()

    if not prefect.settings.PREFECT_API_URL.value():
        raise MuontrackError(
            "schedules need a running Prefect server: start `prefect server start` and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api first"
        )
    check_prefect_server(prefect.settings.PREFECT_API_URL.value())
    base = Path(os.environ.get("MUONTRACK_SERVE_DIR", DEFAULT_SERVE_DIR))
    serve(*build_deployments(base))


def check_prefect_server(api_url: str, timeout: float = 5.0) -> None:
    """MuontrackError (one line) unless a Prefect server answers ``api_url``/health: Prefect's own client would
    fail later with a long traceback of connection errors."""
    import httpx

    try:
        response = httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError as err:
        raise MuontrackError(
            f"no Prefect server answers at PREFECT_API_URL={api_url} ({type(err).__name__}); start "
            "`prefect server start` or point PREFECT_API_URL at a running one"
        ) from None
