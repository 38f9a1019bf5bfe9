"""The classical (non-learned) reference reconstruction: strip clusters, a straight-line road search seeded
from the outer stations, a deterministic annealing filter (GenFit DAF style, Hyper circle refits) and a
float64 scattering-aware final fit (General Broken Lines, :mod:`classical.gbl`) that removes outlier layers,
all in Numba.

Imports run one way: this package uses only :mod:`pipeline` (and NumPy, Numba, Polars, pyarrow). The fit
status codes are pipeline.schema's STATUS_*; the material of a detector is pipeline.config.detector_material.
"""

from classical.circle import hyper_circle_fit_f64, hyper_fit
from classical.clusters import Clusters, cluster_hits, find_clusters
from classical.predict import MODEL_NAME, SplitHits, predict_classical, prediction_tables, read_split
from classical.reco import ClassicalParams, ClassicalTracks, track_event, track_events, track_events_kernel

__all__ = [
    "MODEL_NAME",
    "ClassicalParams",
    "ClassicalTracks",
    "Clusters",
    "SplitHits",
    "cluster_hits",
    "find_clusters",
    "hyper_circle_fit_f64",
    "hyper_fit",
    "predict_classical",
    "prediction_tables",
    "read_split",
    "track_event",
    "track_events",
    "track_events_kernel",
]
