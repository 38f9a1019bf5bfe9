"""The classical (non-learned) reference reconstruction: strip clusters, a straight-line road search seeded
from the outer stations, a deterministic annealing filter (GenFit DAF style, Hyper circle refits) and a
float64 scattering-aware final fit (General Broken Lines, :mod:`classical.gbl`) that removes
outlier layers, all in Numba.

Imports run one way: this package uses only :mod:`pipeline` (and NumPy, Numba, Polars, pyarrow).
"""

from classical.circle import (
    STATUS_DEGENERATE,
    STATUS_NONFINITE,
    STATUS_OK,
    STATUS_TOO_FEW_LAYERS,
    hyper_circle_fit,
    hyper_fit,
)
from classical.clusters import Clusters, cluster_hits, find_clusters
from classical.predict import MODEL_NAME, SplitHits, predict_classical, prediction_tables, read_split
from classical.reco import ClassicalParams, Reconstruction, reconstruct, reconstruct_event, reconstruct_events

__all__ = [
    "MODEL_NAME",
    "STATUS_DEGENERATE",
    "STATUS_NONFINITE",
    "STATUS_OK",
    "STATUS_TOO_FEW_LAYERS",
    "ClassicalParams",
    "Clusters",
    "Reconstruction",
    "SplitHits",
    "cluster_hits",
    "find_clusters",
    "hyper_circle_fit",
    "hyper_fit",
    "predict_classical",
    "prediction_tables",
    "read_split",
    "reconstruct",
    "reconstruct_event",
    "reconstruct_events",
]
