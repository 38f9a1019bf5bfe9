"""Arrow schemas of every Parquet table the project writes (the file contract: docs/contracts.md).

Readers check files against these schemas; writers cast to them, so a dataset is readable by pyarrow,
Polars and DuckDB with the documented column names and types.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.registry import REPORT_ROWS

#: one row per fired strip
HITS_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.int64(), nullable=False),
        pa.field("hit_id", pa.int32(), nullable=False),  # index within the event
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("strip", pa.int32(), nullable=False),
        pa.field("x", pa.float32(), nullable=False),  # strip centre [mm]
        pa.field("y", pa.float32(), nullable=False),  # layer plane [mm]
        pa.field("charge", pa.float32(), nullable=False),  # measured: particles, cross-talk and electronic noise
        # the muon's own charge on the strip, after cross-talk and before the noise (0 where it gave none)
        pa.field("charge_muon", pa.float32(), nullable=False),
        pa.field("is_signal", pa.bool_(), nullable=False),  # the muon gave most of the strip's charge
        pa.field("particle_id", pa.int32(), nullable=False),  # 0 muon, -1 noise, k > 0 extra track k
    ]
)

#: one row per event (truth)
EVENTS_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.int64(), nullable=False),
        pa.field("pt", pa.float32(), nullable=False),  # [GeV]
        pa.field("q", pa.int8(), nullable=False),  # +1 / -1
        pa.field("x0", pa.float32(), nullable=False),  # muon x at the first layer [mm]
        pa.field("theta0", pa.float32(), nullable=False),  # muon angle to the y axis at the first layer [rad]
        pa.field("n_hits", pa.int32(), nullable=False),
        # the muon's crossing x on each layer [mm]; NaN where it left the active width
        pa.field("x_true", pa.list_(pa.float32()), nullable=False),
    ]
)

#: REPORT/predictions/hits.parquet
PRED_HITS_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.int64()),
        pa.field("hit_id", pa.int32()),
        pa.field("model", pa.string()),
        pa.field("score", pa.float32()),  # the classifier output: sigmoid(logit); the truth label; classical's 1/0
        # the hit's weight in the model's final clusters: the score for the paper chain, the refined (annealed)
        # weight for the robust chain (for assignment: of its 0/1 selection), 1/0 for classical, the label for truth
        pa.field("weight", pa.float32()),
    ]
)

#: the `fit_status` codes of PRED_TRACKS_SCHEMA, which every track fit returns (model.fit, model.scattering_fit,
#: classical.circle, classical.gbl, classical.reco): the fit is good
STATUS_OK = 0
#: fewer layers than the fit needs
STATUS_TOO_FEW_LAYERS = 1
#: the circle is undefined: collinear (or coincident) points, a vanishing determinant, no positive weight
STATUS_DEGENERATE = 2
#: a non-finite value came out of the fit
STATUS_NONFINITE = 3

#: REPORT/predictions/tracks.parquet
PRED_TRACKS_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.int64()),
        pa.field("model", pa.string()),
        pa.field("pt_pred", pa.float32()),
        pa.field("q_pred", pa.int8()),
        pa.field("q_over_pt_pred", pa.float32()),
        pa.field("radius", pa.float32()),  # fitted radius [mm]
        pa.field("fit_status", pa.int8()),  # STATUS_OK (0) ok, >0 a failed or degenerate fit (STATUS_*)
        # the fitted track's crossing x of each layer [mm], one per layer; all NaN when the fit failed
        pa.field("x_fit", pa.list_(pa.float32())),
    ]
)


def fitted_crossings(x_fit: np.ndarray, status: np.ndarray, q_over_pt: np.ndarray) -> np.ndarray:
    """The ``x_fit`` column of PRED_TRACKS_SCHEMA from a tracker's fitted crossings ``[E, L]`` [mm]: float32, NaN
    on every layer of an event whose fit failed (``status != 0`` or a non-finite ``q_over_pt``, the failed fits
    of docs/contracts.md) and wherever a crossing is not finite."""
    x_fit = np.asarray(x_fit, np.float32)
    failed = (np.asarray(status) != STATUS_OK) | ~np.isfinite(np.asarray(q_over_pt))
    return np.where(failed[:, None] | ~np.isfinite(x_fit), np.float32(np.nan), x_fit)


#: REPORT/predictions/clusters.parquet
PRED_CLUSTERS_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.int64()),
        pa.field("layer", pa.int16()),
        pa.field("model", pa.string()),
        pa.field("x_reco", pa.float32()),
        pa.field("sigma", pa.float32()),
        pa.field("weight", pa.float32()),
        pa.field("x_true", pa.float32()),
    ]
)

#: RUN/metrics.parquet
TRAIN_METRICS_SCHEMA = pa.schema(
    [
        pa.field("epoch", pa.int32()),
        pa.field("step", pa.int64()),
        pa.field("split", pa.string()),  # "train" or "val"
        pa.field("loss", pa.float32()),
        pa.field("bce", pa.float32()),
        pa.field("pt_loss", pa.float32()),
        pa.field("lambda", pa.float32()),
        pa.field("seconds", pa.float32()),
        # the per-epoch diagnostics (model/run_folder.py's docstring), null where they do not apply
        pa.field("grad_norm", pa.float32()),
        pa.field("learning_rate", pa.float32()),
        pa.field("sigma68", pa.float32()),
        # the assignment model's Hamming term and the share of layers with hits that got a window (both splits)
        pa.field("hamming", pa.float32()),
        pa.field("selected_layers", pa.float32()),
        # train rows: mean |dL/dlogit| per hit from the BCE and from the solver (or chain), and the share of hits
        # where the latter is not 0 (model.steps.train_step)
        pa.field("bce_grad", pa.float32()),
        pa.field("solver_grad", pa.float32()),
        pa.field("solver_grad_nonzero", pa.float32()),
    ]
)

#: the `model` column's values in REPORT/predictions, in report order (pipeline.registry, the registry of models)
MODEL_NAMES = REPORT_ROWS
