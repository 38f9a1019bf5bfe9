"""The ``muontrack`` command line.

Each command is a thin shell around one library function; heavy imports (JAX, Prefect) happen inside the
command so ``muontrack --help`` and ``muontrack inspect`` start fast. Every :class:`MuontrackError` becomes a
one-line ``error: ...`` on stderr, never a traceback, with exit status 2 for a usage error (click's own and
:class:`ConfigError`) and 1 for a failure at run time.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from pipeline.cache import enable_compilation_cache
from pipeline.errors import MuontrackError
from pipeline.registry import ESTIMATORS, TRAINED_MODELS


class _PlainTypes:
    """A command whose ``--help`` shows what a value is: typer writes ``<bool>`` beside every flag (``--json``,
    ``--help``), as if it took a value, and ``<list[Path]>`` beside a repeatable option or argument, which takes
    one path each time. Flags show no type; a repeated parameter the type of one value (``<path>``,
    ``<baseline|e2e|...>``)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
                continue
            shown = param.display_type_rich(ctx) if hasattr(param, "display_type_rich") else None
            match = re.fullmatch(r"<list\[(.*)\]>(\.\.\.)?", shown or "")
            if match and param.metavar is None:
                one = f"<{'path' if match[1] == 'Path' else match[1]}>"
                # an option's type column is its metavar, but an argument's metavar renames it (and its usage)
                param.display_type_rich = lambda ctx, one=one: one  # noqa: ARG005
        return params


class _Command(_PlainTypes, TyperCommand):
    pass


class _Group(_PlainTypes, TyperGroup):
    pass


app = typer.Typer(
    name="muontrack",
    cls=_Group,
    help="Toy muon detector simulation, end-to-end differentiable tracking and its evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


#: ``--model``'s and ``--estimator``'s choices: the trained models and estimators of pipeline.registry (no JAX)
ModelName = StrEnum("ModelName", {name: name for name in TRAINED_MODELS})
EstimatorName = StrEnum("EstimatorName", {name: name for name in ESTIMATORS})


class Checkpoint(StrEnum):
    """``evaluate --checkpoint``: model.run_folder.CHECKPOINTS (kept equal by tests/test_training_curves.py)."""

    best = "best"
    last = "last"


class Preset(StrEnum):
    test = "test"
    cpu = "cpu"
    paper = "paper"


def _print_version(value: bool) -> None:
    if value:
        from flows.commands import code_version

        typer.echo(f"muontrack {code_version()}")
        raise typer.Exit(code=0)


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version (package + code hash)."
        ),
    ] = False,
) -> None:
    """Toy muon detector simulation, end-to-end differentiable tracking and its evaluation."""


def _echo_json(document: object) -> None:
    """One JSON document on stdout (what a script parses); logs and progress stay on stderr."""
    import json

    typer.echo(json.dumps(document, indent=2, default=str))


@app.command(cls=_Command)
def simulate(
    events: Annotated[int, typer.Option("--events", help="Number of events to simulate.")],
    out: Annotated[Path, typer.Option("--out", help="Dataset folder to write (resumed if incomplete).")],
    seed: Annotated[int, typer.Option("--seed", help="Dataset seed; same config + seed => same rows.")] = 0,
    workers: Annotated[int, typer.Option("--workers", help="Parallel shard writers.")] = 1,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="JSON or TOML config file; its simulation section overrides the defaults."),
    ] = None,
    dask_address: Annotated[
        str | None, typer.Option("--dask-address", help="Run the shards on this Dask cluster (tcp://HOST:PORT).")
    ] = None,
) -> None:
    """Simulate muon events and write them as a Parquet dataset."""
    from pipeline.config import SimConfig

    # the file's model and train sections are for `train` and `run`: one file can serve the three commands
    sim_config = SimConfig.from_file(config) if config is not None else SimConfig()
    if dask_address:
        from flows.end_to_end import simulate_on_dask

        manifest = simulate_on_dask(str(out), events, seed, sim_config.to_json(), workers, dask_address)
    else:
        from simulation.shards import simulate_dataset

        manifest = simulate_dataset(out, n_events=events, seed=seed, config=sim_config, workers=workers, progress=True)
    typer.echo(f"wrote {manifest['n_events']} events, {manifest['n_hits']} hits to {out}")


@app.command(cls=_Command)
def inspect(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder.")],
    verify: Annotated[
        bool, typer.Option("--verify", help="Re-read every shard file (checksums, finite values), cached or not.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")] = False,
) -> None:
    """Print a Polars summary of a dataset."""
    if as_json:
        from pipeline.inspect import dataset_record

        _echo_json(dataset_record(dataset, verify=verify))
        return
    from pipeline.inspect import summarize_dataset

    typer.echo(summarize_dataset(dataset, verify=verify))


@app.command(cls=_Command)
def train(
    data: Annotated[Path, typer.Option("--data", help="Dataset folder.")],
    model: Annotated[ModelName, typer.Option("--model", help="Which model to train.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder to write.")],
    preset: Annotated[Preset, typer.Option("--preset", help="Model/training size.")] = Preset.cpu,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Override the preset's epochs.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Training seed.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.")] = False,
    estimator: Annotated[
        EstimatorName | None,
        typer.Option("--estimator", help="assignment: gradient estimator through the solver (default: blackbox)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="JSON or TOML config file: its model and train sections override the preset's values (--epochs "
            "and --estimator override the file's).",
        ),
    ] = None,
    warm_start: Annotated[
        Path | None,
        typer.Option(
            "--warm-start",
            help="e2e, e2e_paper: the run folder of a baseline trained with the same configs, seed and dataset; "
            "its lambda = 0 warm-up epochs, which this model would repeat bit for bit, are taken from it (read only).",
        ),
    ] = None,
) -> None:
    """Train a tracker on a dataset; RUN/training_curves.png is redrawn after every epoch."""
    overrides = _training_overrides(config, preset.value) if config is not None else None
    from flows.commands import train as train_model

    summary = train_model(
        data,
        model.value,
        out,
        preset=preset.value,
        epochs=epochs,
        seed=seed,
        resume=resume,
        progress=True,
        estimator=estimator.value if estimator else None,
        overrides=overrides,
        warm_start=warm_start,
    )
    typer.echo(f"trained {model.value} -> {out} ({summary})")


def _training_overrides(path: Path, preset: str) -> dict:
    """The model and train sections of config file ``path`` (``train --config``), checked over ``preset`` before
    JAX loads (train_run applies them). A simulation section is refused: the dataset fixes the simulation."""
    from model.hyperparameters import configure
    from pipeline.config import read_config_file
    from pipeline.errors import ConfigError

    sections = read_config_file(path)
    if "simulation" in sections:
        raise ConfigError(
            f"config file {path} has a simulation section, which `muontrack train` cannot apply: the dataset "
            "--data fixes the simulation (use the section with `muontrack simulate` or `muontrack run`)"
        )
    configure(preset, sections)
    return sections


@app.command(cls=_Command)
def evaluate(
    data: Annotated[Path, typer.Option("--data", help="Dataset folder (its test split is evaluated).")],
    run: Annotated[list[Path], typer.Option("--run", help="Run folder; repeat for several models.")],
    out: Annotated[Path, typer.Option("--out", help="Report folder to write.")],
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace a report of other runs or another dataset in --out (same runs: refreshed)."
        ),
    ] = False,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="Print the report path and the per-model summary as one JSON document."),
    ] = False,
    workers: Annotated[
        int,
        typer.Option(
            "--workers", min=1, help="Predict shard by shard on a local Dask cluster of K processes (1: in this one)."
        ),
    ] = 1,
    dask_address: Annotated[
        str | None,
        typer.Option("--dask-address", help="Predict shard by shard on this Dask cluster (tcp://HOST:PORT)."),
    ] = None,
    checkpoint: Annotated[
        Checkpoint,
        typer.Option(
            "--checkpoint", help="Each run's parameters: of its best validation sigma68 epoch, or of its last epoch."
        ),
    ] = Checkpoint.best,
) -> None:
    """Evaluate trained runs against the truth reference and write the report (progress on stderr)."""
    import json

    from analysis.report_folder import REPORT_NAME, SUMMARY_NAME

    if workers > 1 or dask_address:
        from flows.end_to_end import evaluate_on_dask

        evaluate_on_dask(str(data), [str(r) for r in run], str(out), overwrite, workers, dask_address, checkpoint.value)
        report = out / REPORT_NAME
    else:
        from flows.commands import evaluate_runs

        report = evaluate_runs(data, run, out, progress=True, overwrite=overwrite, checkpoint=checkpoint.value)
    if json_output:
        summary = json.loads((report.parent / SUMMARY_NAME).read_text())
        _echo_json({"report": str(report), "summary": summary})
    else:
        typer.echo(f"report: {report}")


@app.command(cls=_Command)
def results(
    folders: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Folders searched recursively for reports' summary.parquet (default: the current folder).",
            show_default=False,
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print every column as one JSON list of rows.")] = False,
    width: Annotated[
        int | None,
        typer.Option(
            "--width",
            min=0,
            help="Fit the table to this many characters, leaving out columns (0: every column). Default: the "
            "terminal's width, or every column when the output is no terminal.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print the results catalog: one row per model of every report found (summary.parquet)."""
    from analysis.catalog import catalog_records, format_catalog, read_catalog

    catalog = read_catalog(folders or [Path(".")])
    if json_output:
        _echo_json(catalog_records(catalog))
    else:
        if width is None:  # the terminal's; every column when written to a file or a pipe
            width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 0
        typer.echo(format_catalog(catalog, width=width or None))


@app.command(cls=_Command)
def display(
    report: Annotated[Path, typer.Option("--report", help="Report folder (of `muontrack evaluate` or `run`).")],
    event: Annotated[int, typer.Option("--event", help="Event id, one of the report's test split.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Figure to write (.png, .pdf or .svg; never inside the report). Default: display-EVENT.png."
        ),
    ] = None,
) -> None:
    """Draw one event of a report: strips, truth, each row's chosen clusters and fitted track, and the muon's road."""
    from analysis.display import display_event

    path = display_event(report, event, out if out is not None else Path(f"display-{event}.png"))
    typer.echo(f"display: {path}")


@app.command(name="run", cls=_Command)
def run_all(
    preset: Annotated[Preset, typer.Option("--preset", help="Size of the whole job.")] = Preset.cpu,
    out: Annotated[Path, typer.Option("--out", help="Folder for dataset, runs and report.")] = Path("muontrack-out"),
    model: Annotated[
        list[ModelName] | None,
        typer.Option(
            "--model",
            help="Model to train and compare; repeat for several. Default: baseline, e2e and e2e_paper for cpu, "
            "all four for test and paper.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document (report path and summary) instead of the table.")
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="JSON or TOML config file: its simulation, model and train sections override the preset's values.",
        ),
    ] = None,
    events: Annotated[
        int | None,
        typer.Option("--events", help="Events to simulate instead of the preset's (600, 20 000 or 10^6)."),
    ] = None,
) -> None:
    """The whole flow: simulate -> train the preset's models (or --model's) -> evaluate -> report."""
    from flows.end_to_end import run_end_to_end
    from pipeline.config import read_config_file

    models = [m.value for m in model] if model else None
    sections = read_config_file(config) if config is not None else None
    result = run_end_to_end(
        preset=preset.value, out=out, models=models, echo=not as_json, overrides=sections, events=events
    )
    if as_json:
        _echo_json(result)


@app.command(name="scan", cls=_Command)
def scan_regimes(
    out: Annotated[Path, typer.Option("--out", help="Folder for the points' datasets, runs, reports and scan/.")],
    preset: Annotated[Preset, typer.Option("--preset", help="Size of the job at every point.")] = Preset.cpu,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="JSON or TOML config file: its simulation, model and train sections override the preset's values "
            "(not the detector or the scaled background rates); its scan section sets the grid (detectors, "
            "background_scales).",
        ),
    ] = None,
    seeds: Annotated[
        int, typer.Option("--seeds", min=1, help="Seeds per point (seed k: dataset and training seed k).")
    ] = 1,
    workers: Annotated[
        int,
        typer.Option("--workers", min=1, help="Run the points in parallel on a local Dask cluster of K processes."),
    ] = 1,
    dask_address: Annotated[
        str | None, typer.Option("--dask-address", help="Run the points on this Dask cluster (tcp://HOST:PORT).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document (report paths and the points) instead of the table.")
    ] = False,
) -> None:
    """Regime scan: the whole flow (baseline and e2e) at every detector x background scale, and a scan report."""
    from flows.scan import run_scan

    result = run_scan(
        preset=preset.value,
        out=out,
        seeds=seeds,
        workers=workers,
        dask_address=dask_address,
        config=config,
        echo=not as_json,
    )
    if as_json:
        _echo_json(result)


@app.command(cls=_Command)
def serve() -> None:
    """Serve the flows as Prefect deployments with schedules (needs a running Prefect server)."""
    from flows.deployments import serve_deployments

    serve_deployments()


def main() -> None:
    # The ephemeral Prefect server's telemetry heartbeat writes to its SQLite database while the first flow
    # run does, and loses the race ("database is locked", a traceback on the console at every start). It
    # would only phone home anyway; a user who wants it sets the variable.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # JAX's persistent compilation cache under $MUONTRACK_CACHE/jax, for this process and the ones it starts
    # (Prefect's, Dask's); set before JAX loads, so `--help` stays fast
    enable_compilation_cache()
    for argument in sys.argv[1:]:
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:
            # Parquet, JSON and Prefect name paths in UTF-8: such a path would fail deep inside, half written
            typer.echo(f"error: the argument {argument!r} is not valid UTF-8; use a UTF-8 name", err=True)
            sys.exit(2)
    try:
        # without standalone mode typer turns Ctrl-C into Exit(130) and *returns* its code (commands return None)
        status = app(standalone_mode=False)
        if isinstance(status, int) and status != 0:
            if status == 130:
                typer.echo("error: interrupted", err=True)
            sys.exit(status)
    except MuontrackError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except OSError as err:
        # what no check anticipated (a disk that fills, a folder that turns read-only): still one line
        where = f": {err.filename}" if err.filename else ""
        typer.echo(f"error: {err.strerror or err}{where}", err=True)
        sys.exit(1)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as err:
        # click's usage errors (typer vendors click in recent versions, so match by shape, not by class)
        if not (hasattr(err, "format_message") and hasattr(err, "exit_code")):
            raise
        if type(err).__name__ == "NoArgsIsHelpError":
            # typer has printed the help already (rich's get_help prints it and returns ""): once is enough
            sys.exit(2)
        ctx = getattr(err, "ctx", None)
        command = f" {ctx.command_path}:" if ctx is not None else ""
        typer.echo(f"error:{command} {err.format_message()}", err=True)
        sys.exit(err.exit_code or 2)


if __name__ == "__main__":
    main()
