"""The ``muontrack`` command line.

Each command is a thin shell around one library function; heavy imports (JAX, Prefect) happen inside the
command so ``muontrack --help`` and ``muontrack inspect`` start fast. Every :class:`MuontrackError` becomes a
one-line ``error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import MuontrackError

app = typer.Typer(
    name="muontrack",
    help="Toy muon detector simulation, end-to-end differentiable tracking and its evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class ModelName(StrEnum):
    baseline = "baseline"
    e2e = "e2e"
    e2e_paper = "e2e_paper"
    assignment = "assignment"


class Preset(StrEnum):
    test = "test"
    cpu = "cpu"
    paper = "paper"


def _print_version(value: bool) -> None:
    if value:
        from flows.steps import code_version

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


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@app.command()
def simulate(
    events: Annotated[int, typer.Option("--events", help="Number of events to simulate.")],
    out: Annotated[Path, typer.Option("--out", help="Dataset folder to write (resumed if incomplete).")],
    seed: Annotated[int, typer.Option("--seed", help="Dataset seed; same config + seed => same rows.")] = 0,
    workers: Annotated[int, typer.Option("--workers", help="Parallel shard writers.")] = 1,
    config: Annotated[Path | None, typer.Option("--config", help="JSON or TOML file overriding defaults.")] = None,
    dask_address: Annotated[
        str | None, typer.Option("--dask-address", help="Run the shards on this Dask cluster (tcp://HOST:PORT).")
    ] = None,
) -> None:
    """Simulate muon events and write them as a Parquet dataset."""
    from pipeline.config import SimConfig

    sim_config = SimConfig.from_file(config) if config is not None else SimConfig()
    if dask_address:
        from flows.end_to_end import simulate_on_dask

        manifest = simulate_on_dask(str(out), events, seed, sim_config.to_json(), workers, dask_address)
    else:
        from simulation.dataset import simulate_dataset

        manifest = simulate_dataset(out, n_events=events, seed=seed, config=sim_config, workers=workers, progress=True)
    typer.echo(f"wrote {manifest['n_events']} events, {manifest['n_hits']} hits to {out}")


@app.command()
def inspect(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder.")],
    verify: Annotated[
        bool, typer.Option("--verify", help="Re-read every shard file (checksums, finite values), cached or not.")
    ] = False,
) -> None:
    """Print a Polars summary of a dataset."""
    from pipeline.inspect import summarize_dataset

    typer.echo(summarize_dataset(dataset, verify=verify))


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", help="Dataset folder.")],
    model: Annotated[ModelName, typer.Option("--model", help="Which model to train.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder to write.")],
    preset: Annotated[Preset, typer.Option("--preset", help="Model/training size.")] = Preset.cpu,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Override the preset's epochs.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Training seed.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.")] = False,
) -> None:
    """Train a tracker on a dataset."""
    from model.train import train_run

    summary = train_run(
        data, model=model.value, out=out, preset=preset.value, epochs=epochs, seed=seed, resume=resume, progress=True
    )
    typer.echo(f"trained {model.value} -> {out} ({summary})")


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option("--data", help="Dataset folder (its test split is evaluated).")],
    run: Annotated[list[Path], typer.Option("--run", help="Run folder; repeat for several models.")],
    out: Annotated[Path, typer.Option("--out", help="Report folder to write.")],
) -> None:
    """Evaluate trained runs against the truth reference and write the report."""
    from flows.steps import evaluate_runs

    report = evaluate_runs(data, run, out, progress=True)
    typer.echo(f"report: {report}")


@app.command(name="run")
def run_all(
    preset: Annotated[Preset, typer.Option("--preset", help="Size of the whole job.")] = Preset.cpu,
    out: Annotated[Path, typer.Option("--out", help="Folder for dataset, runs and report.")] = Path("muontrack-out"),
    model: Annotated[
        list[ModelName] | None,
        typer.Option(
            "--model",
            help="Model to train and compare; repeat for several. Default: baseline and e2e for cpu, all three "
            "for test and paper.",
        ),
    ] = None,
) -> None:
    """The whole flow: simulate -> train baseline and e2e (and assignment) -> evaluate -> report."""
    from flows.end_to_end import run_end_to_end

    run_end_to_end(preset=preset.value, out=out, models=[m.value for m in model] if model else None)


@app.command()
def serve() -> None:
    """Serve the flows as Prefect deployments with schedules (needs a running Prefect server)."""
    from flows.deployments import serve_deployments

    serve_deployments()


def main() -> None:
    # The ephemeral Prefect server's telemetry heartbeat writes to its SQLite database while the first flow
    # run does, and loses the race ("database is locked", a traceback on the console at every start). It
    # would only phone home anyway; a user who wants it sets the variable.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        app(standalone_mode=False)
    except MuontrackError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:
        # click's usage errors (typer vendors click in recent versions, so match by shape, not by class)
        if not (hasattr(err, "format_message") and hasattr(err, "exit_code")):
            raise
        if type(err).__name__ == "NoArgsIsHelpError":
            typer.echo(err.ctx.get_help() if getattr(err, "ctx", None) else err.format_message(), err=True)
            sys.exit(2)
        ctx = getattr(err, "ctx", None)
        command = f" {ctx.command_path}:" if ctx is not None else ""
        typer.echo(f"error:{command} {err.format_message()}", err=True)
        sys.exit(err.exit_code or 2)


if __name__ == "__main__":
    main()
