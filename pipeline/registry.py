"""The one registry of model names: what can be trained, which rows of the report each gives, in which order.

Everything that lists models derives from here: the CLI's ``--model`` and ``--estimator`` choices
(flows.cli), the models a ``muontrack run`` job trains (flows.commands), the `model` column's values and the
report's row order (pipeline.schema.MODEL_NAMES, analysis), the rows of the summary and catalog
(:data:`SUMMARY_ROWS`: the model rows and the :data:`LIMIT_ROW`), TrainConfig's estimator and noise choices
(model.hyperparameters). The implementations check themselves against it: model.objectives registers exactly the
:data:`TRAINED_MODELS` with the rows named here, model.assignment implements the :data:`ESTIMATORS` and
:data:`NOISES`.

No JAX here (nor anything heavy): ``muontrack --help`` builds its choices from this module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """One model of the comparison."""

    name: str
    #: the rows of the report's `model` column it gives; a trained model's first row is the one it trains for
    rows: tuple[str, ...]
    #: trained with ``muontrack train --model NAME`` (False: a reference that needs no training)
    trained: bool = True
    #: trained by the ``cpu`` job by default (``muontrack run --preset cpu``; the others add it with --model)
    in_cpu_job: bool = True
    #: trained by the ``test`` job by default (the smoke run the tests make; the others add it with --model)
    in_test_job: bool = True
    #: the model whose run this one's lambda = 0 warm-up epochs repeat bit for bit (same network, same BCE
    #: gradient: the pT term's is exactly 0 there), given the same configs, seed and dataset: a job that trains both
    #: starts this one from that run's warm-up checkpoints instead of training them again (model.train, "Warm
    #: start"). Only where tests/test_warm_start.py finds the epochs identical: share_e2e's parameters differ from
    #: share_baseline's in their last bits already in epoch 1, so it trains its own
    warm_up_from: str | None = None


#: every model, trained ones in training order (the order of ``--model`` choices and of a job's runs)
MODELS: tuple[ModelSpec, ...] = (
    # the truth references (labels as weights; model.inference) and the classical tracker (classical)
    ModelSpec("truth", rows=("truth", "truth_charge", "truth_share"), trained=False),
    ModelSpec("classical", rows=("classical",), trained=False),
    # the factorised baseline is one network reported with both reconstruction chains
    ModelSpec("baseline", rows=("baseline", "baseline_paper")),
    ModelSpec("e2e", rows=("e2e",), warm_up_from="baseline"),
    ModelSpec("e2e_paper", rows=("e2e_paper",), warm_up_from="baseline"),
    # the cpu job leaves it out to stay near ten minutes
    ModelSpec("assignment", rows=("assignment",), in_cpu_job=False),
    # the network's output is the muon's share of each strip's charge (model.objectives): trained on the share
    # alone, and end to end through the robust chain; added to a cpu or test job with --model
    ModelSpec("share_baseline", rows=("share_baseline",), in_cpu_job=False, in_test_job=False),
    ModelSpec("share_e2e", rows=("share_e2e",), in_cpu_job=False, in_test_job=False),
)

#: the rows of the `model` column, in report order: references, then the paper-chain networks, then the
#: robust-chain ones, the assignment model and the share models
REPORT_ROWS: tuple[str, ...] = (
    "truth",
    "truth_charge",
    "truth_share",
    "classical",
    "baseline_paper",
    "e2e_paper",
    "baseline",
    "e2e",
    "assignment",
    "share_baseline",
    "share_e2e",
)

#: the summary's reference row that no model gives: the Cramér-Rao limit of σ68(q/pT) on the evaluated events
#: (analysis.limit, analysis.metrics.resolution_limit). Neither trained nor a prediction, so not in
#: :data:`REPORT_ROWS` (the `model` column of REPORT/predictions); a row of summary.json, resolution.csv and the
#: catalog, and the yardstick of every row's ``sigma68_over_limit``
LIMIT_ROW = "limit"
#: the rows of summary.json, the report's tables, resolution.csv and the catalog, in report order: the limit
#: first (the floor every row is measured against), then :data:`REPORT_ROWS`
SUMMARY_ROWS: tuple[str, ...] = (LIMIT_ROW, *REPORT_ROWS)

#: the models ``muontrack train --model`` takes
TRAINED_MODELS: tuple[str, ...] = tuple(spec.name for spec in MODELS if spec.trained)
#: what the ``cpu`` job trains unless told otherwise
CPU_JOB_MODELS: tuple[str, ...] = tuple(spec.name for spec in MODELS if spec.trained and spec.in_cpu_job)
#: what the ``test`` job trains unless told otherwise
TEST_JOB_MODELS: tuple[str, ...] = tuple(spec.name for spec in MODELS if spec.trained and spec.in_test_job)
#: the rows that need no trained run (always in a report)
REFERENCE_ROWS: tuple[str, ...] = tuple(row for spec in MODELS if not spec.trained for row in spec.rows)

#: the ``assignment`` model's gradient estimators through its solver (TrainConfig.estimator, ``--estimator``)
ESTIMATORS: tuple[str, ...] = ("blackbox", "identity", "perturbed")
#: the perturbed estimator's noise distributions (TrainConfig.perturbation_noise)
NOISES: tuple[str, ...] = ("gumbel", "normal")


def get_model(name: str) -> ModelSpec:
    """The spec of a model name; KeyError for an unknown one."""
    for spec in MODELS:
        if spec.name == name:
            return spec
    raise KeyError(name)


#: the models other models start their warm-up from (ModelSpec.warm_up_from): their runs keep the checkpoints of
#: their warm-up epochs
WARM_UP_DONORS: tuple[str, ...] = tuple(sorted({spec.warm_up_from for spec in MODELS if spec.warm_up_from}))


def _check() -> None:
    donors = {spec.warm_up_from for spec in MODELS if spec.warm_up_from}
    trained = {spec.name for spec in MODELS if spec.trained}
    if not donors <= trained:
        raise AssertionError(f"warm_up_from must name trained models, got {sorted(donors - trained)}")
    rows = [row for spec in MODELS for row in spec.rows]
    if sorted(rows) != sorted(REPORT_ROWS) or len(set(rows)) != len(rows):
        raise AssertionError(f"REPORT_ROWS {REPORT_ROWS} must list each model's rows once, got {rows}")
    if LIMIT_ROW in rows or LIMIT_ROW in {spec.name for spec in MODELS}:
        raise AssertionError(f"{LIMIT_ROW!r} is the limit's row: no model may give it")


_check()
