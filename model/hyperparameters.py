"""Model and training hyper-parameters, and the named presets (``--preset {test,cpu,paper}``).

MLP widths are the *output* widths of the dense layers; the input width is implied (4 features for the query
MLP, the hidden size H for the others). So the paper's Table 1 (Coccaro et al., arXiv 2512.01647, appendix A)
query MLP [4, 8, ..., 512] is ``query_mlp=(8, ..., 512)``, its attention logit MLP [1024 -> 512 -> 512] is
``logit_mlp=(512, 512)`` (the input is the concatenation [h_i, h_j] of width 2H) and its node update
[512, 256, ..., 1] is ``update_mlp=(256, ..., 1)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import STRICT, check, load_config
from pipeline.errors import ConfigError
from pipeline.registry import ESTIMATORS, NOISES

# ESTIMATORS and NOISES (pipeline.registry, the registry of names): TrainConfig.estimator's choices and
# TrainConfig.perturbation_noise's (model.assignment implements them)


def _positive_widths(name: str, widths: tuple[int, ...]) -> None:
    check(
        isinstance(widths, tuple) and len(widths) >= 1 and all(isinstance(v, int) and v >= 1 for v in widths),
        f"model.{name} must be a non-empty tuple of positive integers, got {widths!r}",
    )


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of the two-layer graph attention network (models.GAT)."""

    __pydantic_config__ = STRICT

    #: node embedding size H (512 in the paper)
    hidden: int
    #: output widths of the query MLP, features -> H; the last must equal ``hidden``
    query_mlp: tuple[int, ...]
    #: output widths of the attention logit MLP on [h_i, h_j]; the first layer is computed per node (W1 h_i +
    #: W2 h_j), the rest per edge; the last, K, is the number of attention scores per edge: ``hidden`` (one
    #: per dimension, the paper) or a divisor of it (K heads of hidden / K dimensions each)
    logit_mlp: tuple[int, ...]
    #: output widths of the node update MLP H -> ... -> 1 (the hit logit); the last must be 1
    update_mlp: tuple[int, ...]
    #: negative slope of the leaky ReLUs (attention logits and hidden MLP layers)
    leaky_relu_slope: float = 0.2
    #: materialise the [B, N, N, H] attention logits even when ``logit_mlp`` has a single layer (whose
    #: attention models.leaky_relu_attention_sorted computes exactly in O(N log N)); for tests and benchmarks
    dense_attention: bool = False
    #: with a multi-layer ``logit_mlp`` (and not ``dense_attention``): receivers per block of
    #: models.edge_mlp_attention_blocked, which forms the per-edge tensors [B, block, N, K] one block at a time
    #: (same function as the dense path up to rounding). For the paper network on 2 CPU cores (H = 512, N = 128,
    #: batch 2) 4 and 8 were equally fast, 16 ~30 % and 32 ~60 % slower (CPU time of the attention's forward and
    #: backward)
    attention_block: int = 8
    #: h_i' = h_i + sum_j a_ij ⊙ h_j in both attention layers (not in the paper's Table 1). Without it the
    #: near-uniform attention at initialisation averages every node of an event to the same vector, so the
    #: hit logits start identical and BCE training does not get off the ground (seen on the cpu preset)
    residual: bool = False

    def __post_init__(self) -> None:
        check(isinstance(self.hidden, int) and self.hidden >= 1, f"model.hidden must be >= 1, got {self.hidden!r}")
        for name in ("query_mlp", "logit_mlp", "update_mlp"):
            _positive_widths(name, getattr(self, name))
        check(self.query_mlp[-1] == self.hidden, "model.query_mlp must end with model.hidden")
        check(
            self.hidden % self.logit_mlp[-1] == 0,
            "model.logit_mlp must end with model.hidden (one score per dimension) or a divisor of it (heads)",
        )
        check(self.update_mlp[-1] == 1, "model.update_mlp must end with 1 (one logit per hit)")
        check(0 <= self.leaky_relu_slope < 1, "model.leaky_relu_slope must be in [0, 1)")
        check(
            isinstance(self.attention_block, int) and self.attention_block >= 1,
            f"model.attention_block must be >= 1, got {self.attention_block!r}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a JSON-like dict (pipeline.config.load_config): all required keys, lists for tuples."""
        return load_config(cls, data, "model")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation settings (model.train)."""

    __pydantic_config__ = STRICT

    epochs: int
    #: events per batch
    batch_size: int
    #: Adam learning rate
    learning_rate: float
    #: weight of the pT loss after the warm-up (paper: 0.5); the baseline trains with 0 throughout
    lambda_pt: float = 0.5
    #: epochs trained on the BCE alone before lambda_pt switches on (paper: "the early training epochs")
    lambda_warmup_epochs: int = 1
    #: node budgets events are padded to (increasing): one compiled shape each; an event with more hits than the
    #: last keeps its highest-charge hits (pipeline.batches). Powers of two suit the sorted attention, which
    #: pads its sort to the next power of two anyway
    node_buckets: tuple[int, ...] = (128, 160, 192, 256, 384)
    #: use at most this many training events (None: all of the training split)
    max_train_events: int | None = None
    #: Orbax checkpoints kept
    keep_checkpoints: int = 3
    #: global-norm gradient clipping
    grad_clip: float = 1.0
    #: the learning rate halves every this many optimiser steps (None: constant). A function of the step
    #: count alone (kept in the optimiser state), so a resumed run follows the same schedule
    lr_half_life_steps: int | None = None
    #: the ``assignment`` model's gradient estimator through its per-layer solver: "blackbox" (Kortus et al.),
    #: "identity" (with cost projection, Sahoo et al.) or "perturbed" (Berthet et al.); model.assignment
    estimator: str = "blackbox"
    #: blackbox: lambda, the step along one event's dL/dz at which the solver is called again
    solver_lambda: float = 30.0
    #: perturbed: draws per event, noise scale in units of window cost, and noise ("gumbel" or "normal")
    perturbation_samples: int = 32
    perturbation_sigma: float = 0.5
    perturbation_noise: str = "gumbel"

    def __post_init__(self) -> None:
        check(isinstance(self.epochs, int) and self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs!r}")
        check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size!r}")
        check(self.learning_rate > 0, f"train.learning_rate must be > 0, got {self.learning_rate!r}")
        check(self.lambda_pt >= 0, f"train.lambda_pt must be >= 0, got {self.lambda_pt!r}")
        check(self.lambda_warmup_epochs >= 0, "train.lambda_warmup_epochs must be >= 0")
        check(
            len(self.node_buckets) >= 1
            and all(b >= 1 for b in self.node_buckets)
            and all(a < b for a, b in zip(self.node_buckets, self.node_buckets[1:], strict=False)),
            f"train.node_buckets must be increasing positive sizes, got {self.node_buckets!r}",
        )
        check(
            self.max_train_events is None or self.max_train_events >= 1,
            "train.max_train_events must be >= 1 or None",
        )
        check(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        check(self.grad_clip > 0, "train.grad_clip must be > 0")
        check(
            self.lr_half_life_steps is None or self.lr_half_life_steps >= 1,
            "train.lr_half_life_steps must be >= 1 or None",
        )
        check(
            self.estimator in ESTIMATORS,
            f"train.estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}",
        )
        check(self.solver_lambda > 0, f"train.solver_lambda must be > 0, got {self.solver_lambda!r}")
        check(self.perturbation_samples >= 1, "train.perturbation_samples must be >= 1")
        check(self.perturbation_sigma > 0, "train.perturbation_sigma must be > 0")
        check(
            self.perturbation_noise in NOISES,
            f"train.perturbation_noise must be one of {', '.join(NOISES)}, got {self.perturbation_noise!r}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a JSON-like dict (pipeline.config.load_config): all required keys, lists for tuples."""
        return load_config(cls, data, "train")


PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    # unit tests and smoke runs: a few seconds on one CPU core
    "test": (
        ModelConfig(hidden=8, query_mlp=(8,), logit_mlp=(8,), update_mlp=(4, 1), residual=True),
        TrainConfig(
            epochs=2,
            batch_size=8,
            learning_rate=3e-3,
            lambda_warmup_epochs=1,
            # one shape: each bucket costs a compilation of train and eval steps (~10-20 s on a CPU)
            node_buckets=(256,),
            max_train_events=256,
            keep_checkpoints=2,
        ),
    ),
    # this machine (2 CPU cores): the paper's structure with H = 32, short MLPs and a one-layer attention logit
    # (GATv2-like LeakyReLU(W1 h_i + W2 h_j + b), computed per node), which removes the per-edge H x H matmul
    # that dominates the cost (12 N^2 H^2 flops per event)
    "cpu": (
        ModelConfig(hidden=32, query_mlp=(16, 32), logit_mlp=(32,), update_mlp=(16, 8, 1), residual=True),
        # sized for the ten-minute job; a high rate learns the BCE fast, halving it keeps the pT phase stable
        TrainConfig(
            epochs=6,
            batch_size=32,
            learning_rate=1e-2,
            lr_half_life_steps=300,
            lambda_warmup_epochs=2,
            node_buckets=(128, 256),
            max_train_events=6_000,
        ),
    ),
    # the paper's Table 1 (an accelerator is advisable: ~N^2 * 512 floats per event and attention layer)
    "paper": (
        ModelConfig(
            hidden=512,
            query_mlp=(8, 16, 32, 64, 128, 256, 512),
            logit_mlp=(512, 512),
            update_mlp=(256, 128, 64, 32, 16, 8, 4, 2, 1),
        ),
        TrainConfig(
            epochs=50,
            batch_size=32,
            learning_rate=1e-3,
            lambda_warmup_epochs=5,
            node_buckets=(128, 160, 192, 256, 384),
            max_train_events=None,
        ),
    ),
}


def get_preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    """The (model, training) configuration of a named preset; ConfigError for an unknown name."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})") from None


def configure(preset: str, overrides: Mapping[str, Any] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The preset's (model, training) configuration with ``overrides`` applied: the ``model`` and ``train``
    sections of a config file (pipeline.config.read_config_file), each holding only the values to change.

    ConfigError (one line, naming the key: ``unknown config key train.epohcs``) for an unknown preset, section
    or key, a wrong type, or values the dataclasses' rules refuse.
    """
    model_config, train_config = get_preset(preset)
    if not overrides:
        return model_config, train_config
    unknown = sorted(set(overrides) - {"model", "train"})
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]} for training (known: model, train)")
    model_config = load_config(ModelConfig, overrides.get("model", {}), "model", base=model_config)
    train_config = load_config(TrainConfig, overrides.get("train", {}), "train", base=train_config)
    return model_config, train_config


def preset_label(preset: str, model_config: ModelConfig, train_config: TrainConfig) -> str:
    """``preset``, or ``preset-<hash>`` when the configuration differs from the preset's (a config file's
    overrides): names what was trained, in run and report folders."""
    if (model_config, train_config) == get_preset(preset):
        return preset
    identity = json.dumps([model_config.to_dict(), train_config.to_dict()], sort_keys=True, separators=(",", ":"))
    return f"{preset}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"
