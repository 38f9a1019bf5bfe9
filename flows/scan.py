"""The regime scan (``muontrack scan``): the ``run`` job at every point of a grid of detectors and background scales.

A point is a named detector (pipeline.config.DETECTORS) and a background scale ``s``: the preset's dataset config
with that detector and its extra tracks, noise strips and noise clusters per layer multiplied by ``s``
(analysis.catalog.scaled_background). At every point and seed the scan runs the ``end-to-end`` flow of
``muontrack run`` (flows.end_to_end: simulate, train ``baseline`` and ``e2e``, evaluate with ``classical``, the
truth references and the ``limit`` row) under the same ``--out``, so every stage is cached exactly as ``run``
caches it (the dataset, run and report folders are named by what they depend on): an interrupted or extended
scan recomputes only the points, and stages, it lacks. The points run one after the other, or in parallel as
tasks on Dask (``--workers K`` > 1: a local cluster of K processes; ``--dask-address``: an existing cluster).
At the end the scan report (analysis.scan_report) gathers the points into OUT/scan/.

A config file serves as for ``run`` (its ``simulation``, ``model`` and ``train`` sections over the preset), plus an
optional ``scan`` section with the grid (:class:`ScanGrid`). Its ``simulation`` section may not set what the grid
sets: the detector, or the three scaled background rates.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE

from analysis.catalog import SCALED_BACKGROUND_FIELDS, scaled_background
from analysis.report_folder import CATALOG_SUMMARY_NAME, prediction_path
from flows import commands
from flows.end_to_end import dask_task_runner, end_to_end, job_configs
from flows.server import ensure_prefect_api
from pipeline.config import CONFIG_SECTIONS, DETECTORS, STRICT, SimConfig, check, load_config, read_config_file
from pipeline.dataset import MANIFEST_NAME
from pipeline.errors import ConfigError, MuontrackError
from pipeline.locks import exclusive_writer

#: the models a scan trains at every point (the rows baseline, baseline_paper and e2e)
SCAN_MODELS = ("baseline", "e2e")
#: the config file's section of the grid
SCAN_SECTION = "scan"


@dataclass(frozen=True)
class ScanGrid:
    """The grid of a scan: every detector name with every background scale (the ``scan`` section of a config file,
    each key optional)."""

    __pydantic_config__ = STRICT

    #: named detectors of pipeline.config.DETECTORS
    detectors: tuple[str, ...] = ("default", "realistic")
    #: multiples of the preset's extra tracks, noise strips and noise clusters per layer
    background_scales: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)

    def __post_init__(self) -> None:
        check(len(self.detectors) >= 1, "scan.detectors must not be empty")
        check(len(self.background_scales) >= 1, "scan.background_scales must not be empty")
        unknown = [name for name in self.detectors if name not in DETECTORS]
        if unknown:
            raise ConfigError(f"scan.detectors: unknown detector {unknown[0]!r} (known: {', '.join(DETECTORS)})")
        bad = [scale for scale in self.background_scales if not (math.isfinite(scale) and scale > 0)]
        if bad:
            raise ConfigError(f"scan.background_scales must be > 0, got {bad[0]!r}")
        for key, values in (("detectors", self.detectors), ("background_scales", self.background_scales)):
            repeated = [value for index, value in enumerate(values) if value in values[:index]]
            if repeated:
                raise ConfigError(f"scan.{key} lists {repeated[0]!r} twice")

    def points(self) -> list[ScanPoint]:
        """Every (detector, background scale), detector by detector, scales in the given order."""
        return [ScanPoint(detector, scale) for detector in self.detectors for scale in self.background_scales]


@dataclass(frozen=True)
class ScanPoint:
    """One regime of a scan: a named detector and a background scale."""

    detector: str
    background_scale: float

    @property
    def label(self) -> str:
        return f"{self.detector}-x{self.background_scale:g}"

    def sim_config(self, base: SimConfig) -> SimConfig:
        """``base`` (the preset's dataset config) with this point's detector and scaled background."""
        return replace(
            base,
            detector=DETECTORS[self.detector],
            background=scaled_background(base.background, self.background_scale),
        )


def read_scan_config(path: str | Path) -> tuple[dict[str, dict[str, Any]], ScanGrid]:
    """The sections of config file ``path`` for ``end_to_end`` (simulation, model, train; pipeline.config
    .read_config_file's rules) and its grid (the ``scan`` section over :class:`ScanGrid`'s defaults).

    ConfigError (one line naming the key) for a file that is not JSON or TOML, an unknown section or key, a wrong
    type, an empty grid, an unknown detector, a scale that is not > 0, or a ``simulation`` key the grid sets.
    """
    data = read_config_file(path, sections=(*CONFIG_SECTIONS, SCAN_SECTION))
    grid = load_config(ScanGrid, data.pop(SCAN_SECTION, {}), SCAN_SECTION)
    check_grid_free(data)
    return data, grid


def check_grid_free(sections: dict[str, Any]) -> None:
    """ConfigError when the ``simulation`` section sets what the grid sets: the detector, or a scaled background
    rate (a point's value would silently replace the file's)."""
    simulation = sections.get("simulation") or {}
    if "detector" in simulation:
        raise ConfigError(
            "config key simulation.detector cannot be used by `muontrack scan`: the scan sets the detector (its "
            "[scan] detectors)"
        )
    background = simulation.get("background") or {}
    for name in SCALED_BACKGROUND_FIELDS:
        if isinstance(background, dict) and name in background:
            raise ConfigError(
                f"config key simulation.background.{name} cannot be used by `muontrack scan`: the scan multiplies the "
                "preset's value (its [scan] background_scales)"
            )


def point_overrides(point: ScanPoint, base: SimConfig, sections: dict[str, Any]) -> dict[str, Any]:
    """The config-file sections of one point for the ``end-to-end`` flow: the file's, with the point's whole
    dataset config as the simulation section."""
    return {**sections, "simulation": point.sim_config(base).to_dict()}


def _mtime_since(path: Path, start: float) -> bool:
    """Whether ``path`` exists and was written at or after ``start`` (seconds since the epoch)."""
    try:
        return path.stat().st_mtime >= start
    except OSError:
        return False


def point_record(point: ScanPoint, seed: int, report: Path, start: float) -> dict[str, Any]:
    """What one point of the scan is and what it computed: detector, background_scale, seed, the report, dataset and
    run folders (as its summary.parquet records them), and which stages wrote since ``start``: ``simulated`` (the
    dataset's manifest), ``trained`` (the models whose run metrics), ``predicted`` (the report's predictions; a
    cached prediction is a link to the previous file)."""
    import polars as pl

    from model.run_folder import METRICS_NAME

    catalog = pl.read_parquet(report / CATALOG_SUMMARY_NAME, columns=["dataset", "model", "run"])
    dataset = Path(catalog["dataset"].drop_nulls()[0])
    runs = {
        model: run
        for model, run in catalog.filter(pl.col("model").is_in(SCAN_MODELS)).select("model", "run").rows()
        if run is not None
    }
    return {
        "detector": point.detector,
        "background_scale": point.background_scale,
        "seed": seed,
        "report": str(report),
        "dataset": str(dataset),
        "runs": runs,
        "simulated": _mtime_since(dataset / MANIFEST_NAME, start),
        "trained": [model for model, run in runs.items() if _mtime_since(Path(run) / METRICS_NAME, start)],
        "predicted": _mtime_since(prediction_path(report, "tracks"), start),
    }


def _point_run_name() -> str:
    """point-DETECTOR-xSCALE-seedS."""
    from prefect.runtime import task_run

    p = task_run.parameters
    return f"point-{p['detector']}-x{p['background_scale']:g}-seed{p['seed']}"


@task(name="scan-point", task_run_name=_point_run_name, cache_policy=NONE, persist_result=False, log_prints=True)
def scan_point(
    out: str,
    preset: str,
    detector: str,
    background_scale: float,
    seed: int,
    overrides: dict[str, Any],
    position: str = "",
) -> dict[str, Any]:
    """One point and seed of the scan: the ``end-to-end`` flow of ``muontrack run`` (its stages cached as there)
    with the point's config (``overrides``, :func:`point_overrides`); returns :func:`point_record`."""
    point = ScanPoint(detector, background_scale)
    start = time.time()
    print(
        f"scan point {position} {detector} detector, background x{background_scale:g}, seed {seed}: simulate, "
        f"train {' and '.join(SCAN_MODELS)}, evaluate"
    )
    flow_run = end_to_end.with_options(flow_run_name=f"end-to-end-{preset}-{point.label}-seed{seed}")
    result = flow_run(out, preset=preset, seed=seed, models=list(SCAN_MODELS), overrides=overrides)
    record = point_record(point, seed, Path(result["report"]).parent, start)
    done = [
        "simulated" if record["simulated"] else "dataset cached",
        f"trained {', '.join(record['trained'])}" if record["trained"] else "runs cached",
        "predicted" if record["predicted"] else "predictions cached",
    ]
    print(f"scan point {position} {point.label} seed {seed} done in {time.time() - start:.0f} s: {'; '.join(done)}")
    return record


@task(name="write-scan-report", cache_policy=NONE, persist_result=False)
def write_scan_report(out: str, records: list[dict[str, Any]], context: dict[str, Any]) -> dict[str, Any]:
    """The scan report in OUT/scan (analysis.scan_report.write_scan_report); returns its paths."""
    from analysis import scan_report

    return scan_report.write_scan_report(Path(out) / scan_report.SCAN_DIR, records, context)


def _scan_run_name() -> str:
    """scan-PRESET-Npoints-Sseeds."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"scan-{p['preset']}-{len(p['points'])}points-{p['seeds']}seeds"


@flow(name="scan", flow_run_name=_scan_run_name, log_prints=True)
def scan(
    out: str,
    preset: str,
    points: list[dict[str, Any]],
    seeds: int = 1,
    overrides: dict[str, Any] | None = None,
    parallel: bool = False,
) -> dict[str, Any]:
    """Every point ({detector, background_scale}) and seed (0 .. seeds - 1) as a :func:`scan_point` task, one after
    the other or (``parallel``) all submitted to the flow's task runner, then the scan report. Returns
    {"report", "summary", "comparisons", "points": the points' records}."""
    job = commands.job_preset(preset, SCAN_MODELS)
    sections = overrides or {}
    base, _, _ = job_configs(job, sections)
    grid = [(ScanPoint(p["detector"], float(p["background_scale"])), seed) for p in points for seed in range(seeds)]
    calls = [
        (out, preset, point.detector, point.background_scale, seed, point_overrides(point, base, sections))
        for point, seed in grid
    ]
    positions = [f"{index}/{len(calls)}" for index in range(1, len(calls) + 1)]
    if parallel:
        futures = [scan_point.submit(*call, position=position) for call, position in zip(calls, positions, strict=True)]
        records = [future.result() for future in futures]
    else:
        records = [scan_point(*call, position=position) for call, position in zip(calls, positions, strict=True)]
    context = {
        "preset": preset,
        "seeds": seeds,
        "detectors": list(dict.fromkeys(p["detector"] for p in points)),
        "background_scales": list(dict.fromkeys(float(p["background_scale"]) for p in points)),
        "code_version": commands.code_version(),
    }
    return {**write_scan_report(out, records, context), "points": records}


def run_scan(
    preset: str,
    out: Path,
    seeds: int = 1,
    workers: int = 1,
    dask_address: str | None = None,
    config: Path | None = None,
    echo: bool = True,
) -> dict[str, Any]:
    """The ``muontrack scan`` entry point: check the config and grid (one-line errors before Prefect starts), run
    the :func:`scan` flow under ``out``'s lock, print (with ``echo``) who wins where and the report's path, and
    return the flow's result."""
    from flows.logs import quiet_user_errors

    sections, grid = read_scan_config(config) if config is not None else ({}, ScanGrid())
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    job = commands.job_preset(preset, SCAN_MODELS)
    base, _, _ = job_configs(job, sections)
    points = grid.points()
    for point in points:  # each point's config checked before any work (a scale can break a config's rules)
        job_configs(job, point_overrides(point, base, sections))
    quiet_user_errors()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MuontrackError(f"--out {out} is a file, not a folder")
    parallel = workers > 1 or bool(dask_address)
    with exclusive_writer(out):
        if parallel:
            runner = dask_task_runner(workers, dask_address)
            flow_call = scan.with_options(task_runner=runner)
        else:
            ensure_prefect_api(export=False)
            flow_call = scan
        result = flow_call(str(out), preset, [asdict(point) for point in points], seeds, sections, parallel)
    if echo:
        import polars as pl

        from analysis.scan_report import format_scan_table

        print(format_scan_table(pl.read_parquet(result["comparisons"])))
        print(f"scan report: {result['report']}")
    return result
