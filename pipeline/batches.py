"""Events as padded, masked arrays for JAX.

An event's nodes are its fired strips. Events are padded to one of a few fixed node budgets (buckets) so
``jit`` compiles a handful of shapes, not one per event. Shapes below: ``B`` events per batch, ``N`` the node
budget of the bucket, ``L`` the number of layers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pipeline.config import DetectorConfig


class Batch(NamedTuple):
    """One padded batch (a pytree of arrays; NumPy on the host, JAX arrays on the device)."""

    features: np.ndarray  # float32 [B, N, 4]: normalised (x, y, charge, layer)
    x: np.ndarray  # float32 [B, N]: strip centre [mm]
    y: np.ndarray  # float32 [B, N]: layer plane [mm]
    layer: np.ndarray  # int32 [B, N]: layer index 0..L-1 (0 on padding)
    charge: np.ndarray  # float32 [B, N]
    mask: np.ndarray  # bool [B, N]: True on real hits, False on padding
    label: np.ndarray  # float32 [B, N]: 1 for signal (muon) hits, 0 for background and padding
    hit_id: np.ndarray  # int32 [B, N]: hit_id of the node (-1 on padding)
    event_id: np.ndarray  # int64 [B]
    pt: np.ndarray  # float32 [B]: true pT [GeV]
    q: np.ndarray  # float32 [B]: true charge +-1
    x_true: np.ndarray  # float32 [B, L]: true crossing x per layer [mm], NaN where absent
    event_mask: np.ndarray  # bool [B]: True on real events, False on padding events of a last batch


class Geometry(NamedTuple):
    """What the reconstruction needs to know about the detector (static under jit)."""

    layer_y: tuple[float, ...]  # [mm], length L
    pitch: float  # [mm]
    b_field: float  # [T]

    @property
    def n_layers(self) -> int:
        return len(self.layer_y)

    @classmethod
    def from_detector(cls, detector: DetectorConfig) -> Geometry:
        return cls(
            layer_y=tuple(float(v) for v in detector.layer_y()),
            pitch=float(detector.pitch),
            b_field=float(detector.b_field),
        )
