"""Typed, validated configuration of the toy detector and of the simulated events.

The configuration lives in ``pipeline`` because it is part of the data contract: the simulation writes it
into every dataset (manifest and Parquet key-value metadata) and the model reads the geometry back from the
dataset (layer positions, pitch, field), so neither package has to import the other.

Units: mm, GeV, tesla, radians. Layers are planes at fixed ``y``; strips measure ``x``; the field is along
``z``. With ``B > 0`` a positive muon moving towards ``+y`` bends towards ``+x``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError

#: pT [GeV] = PT_PER_TESLA_METRE * B [T] * R [m]
PT_PER_TESLA_METRE = 0.299792458


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class DetectorConfig:
    """Geometry and response of the strip detector (defaults of DESIGN.md)."""

    layers_per_station: tuple[int, ...] = (8, 4, 4)
    #: y of the first layer of each station [mm]
    station_y: tuple[float, ...] = (0.0, 750.0, 1500.0)
    #: distance between consecutive layers inside a station [mm] (two 10 mm PCBs around a 5 mm gas gap)
    layer_spacing: float = 25.0
    x_min: float = -500.0
    x_max: float = 500.0
    #: strip pitch [mm]
    pitch: float = 0.5
    #: field along z [T]
    b_field: float = 1.0
    #: sigma of the Gaussian charge spread, in units of the pitch
    charge_sigma_pitch: float = 2.0 / 3.0
    #: mean total charge of one cluster (arbitrary units)
    charge_mean: float = 1.0
    #: relative RMS of the total cluster charge (gamma-distributed fluctuation)
    charge_rms: float = 0.3
    #: a strip fires when its summed charge exceeds this fraction of ``charge_mean``; 0.0115 gives a mean
    #: cluster size of 4.0 strips for an isolated muon crossing (with the defaults above)
    threshold: float = 0.0115
    #: material per layer in radiation lengths (Highland multiple scattering)
    x_over_x0: float = 0.01
    multiple_scattering: bool = True

    def __post_init__(self) -> None:
        _check(len(self.layers_per_station) >= 1, "detector.layers_per_station must not be empty")
        _check(all(n >= 1 for n in self.layers_per_station), "detector.layers_per_station entries must be >= 1")
        _check(
            len(self.station_y) == len(self.layers_per_station),
            "detector.station_y needs one entry per station in detector.layers_per_station",
        )
        _check(self.layer_spacing > 0, "detector.layer_spacing must be > 0 mm")
        _check(self.x_max > self.x_min, "detector.x_max must be greater than detector.x_min")
        _check(self.pitch > 0, "detector.pitch must be > 0 mm")
        _check(self.b_field > 0, "detector.b_field must be > 0 T")
        _check(self.charge_sigma_pitch > 0, "detector.charge_sigma_pitch must be > 0")
        _check(self.charge_mean > 0, "detector.charge_mean must be > 0")
        _check(self.charge_rms >= 0, "detector.charge_rms must be >= 0")
        _check(0 < self.threshold < 1, "detector.threshold must be in (0, 1) (a fraction of charge_mean)")
        _check(self.x_over_x0 >= 0, "detector.x_over_x0 must be >= 0")
        ys = self.layer_y()
        _check(bool(np.all(np.diff(ys) > 0)), "detector stations overlap: layer y positions must increase")

    @property
    def n_layers(self) -> int:
        return int(sum(self.layers_per_station))

    @property
    def n_strips(self) -> int:
        return math.floor((self.x_max - self.x_min) / self.pitch)

    @property
    def charge_sigma(self) -> float:
        """Sigma of the Gaussian charge spread [mm]."""
        return self.charge_sigma_pitch * self.pitch

    def layer_y(self) -> np.ndarray:
        """y of every layer [mm], shape ``(n_layers,)``, increasing."""
        return np.concatenate(
            [
                y0 + self.layer_spacing * np.arange(n, dtype=np.float64)
                for y0, n in zip(self.station_y, self.layers_per_station, strict=True)
            ]
        )

    def strip_center(self, strip: np.ndarray) -> np.ndarray:
        """x of the centre of strip index ``strip`` [mm]."""
        return self.x_min + (np.asarray(strip) + 0.5) * self.pitch


@dataclass(frozen=True)
class MuonConfig:
    """The signal muon: one per event, entering station 1."""

    pt_min: float = 20.0
    pt_max: float = 50.0
    #: Gaussian spread of the muon's x at the first layer [mm]
    x0_sigma: float = 100.0
    #: Gaussian spread of the muon's angle to the y axis at the first layer [rad]
    theta0_sigma: float = 0.05

    def __post_init__(self) -> None:
        _check(self.pt_min > 0, "muon.pt_min must be > 0 GeV")
        _check(self.pt_max > self.pt_min, "muon.pt_max must be greater than muon.pt_min (pT range reversed?)")
        _check(self.x0_sigma >= 0, "muon.x0_sigma must be >= 0 mm")
        _check(0 <= self.theta0_sigma < 0.5, "muon.theta0_sigma must be in [0, 0.5) rad")


@dataclass(frozen=True)
class BackgroundConfig:
    """Noise and extra tracks. Defaults give roughly as many background as signal hits."""

    #: mean number of isolated noise strips per layer (Poisson), anywhere on the layer
    noise_strips_per_layer: float = 1.0
    #: mean number of noise clusters per layer (Poisson), anywhere on the layer
    noise_clusters_per_layer: float = 0.25
    #: mean number of extra low-momentum tracks per event (Poisson)
    extra_tracks_per_event: float = 2.0
    extra_track_pt_min: float = 0.3
    extra_track_pt_max: float = 3.0
    #: an extra track crosses between these many consecutive layers (inclusive)
    extra_track_layers_min: int = 2
    extra_track_layers_max: int = 6
    #: extra tracks start this close (Gaussian sigma, mm) to the muon's crossing on their first layer
    extra_track_spread: float = 20.0

    def __post_init__(self) -> None:
        _check(self.noise_strips_per_layer >= 0, "background.noise_strips_per_layer must be >= 0")
        _check(self.noise_clusters_per_layer >= 0, "background.noise_clusters_per_layer must be >= 0")
        _check(self.extra_tracks_per_event >= 0, "background.extra_tracks_per_event must be >= 0")
        _check(self.extra_track_pt_min > 0, "background.extra_track_pt_min must be > 0 GeV")
        _check(
            self.extra_track_pt_max >= self.extra_track_pt_min,
            "background.extra_track_pt_max must be >= background.extra_track_pt_min",
        )
        _check(self.extra_track_layers_min >= 1, "background.extra_track_layers_min must be >= 1")
        _check(
            self.extra_track_layers_max >= self.extra_track_layers_min,
            "background.extra_track_layers_max must be >= background.extra_track_layers_min",
        )
        _check(self.extra_track_spread >= 0, "background.extra_track_spread must be >= 0 mm")


@dataclass(frozen=True)
class SimConfig:
    """Everything that determines the rows of a dataset (together with the seed)."""

    detector: DetectorConfig = field(default_factory=DetectorConfig)
    muon: MuonConfig = field(default_factory=MuonConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    #: events per Parquet shard (a unit of work, of resume and of memory)
    shard_events: int = 20_000

    def __post_init__(self) -> None:
        _check(self.shard_events >= 1, "shard_events must be >= 1")

    # ---- (de)serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): equal configs give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def config_hash(self) -> str:
        """A short stable hash of the configuration, for cache keys and dataset identity."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def physics_hash(self) -> str:
        """A short stable hash of what decides the physics of the rows: the config without ``shard_events``,
        which only cuts the same events into other files. Trained models are compatible across it."""
        physics = {key: value for key, value in self.to_dict().items() if key != "shard_events"}
        return hashlib.sha256(json.dumps(physics, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimConfig:
        """Build from a (possibly partial) nested dict; missing keys take defaults, unknown keys are errors."""
        return _from_dict(cls, data, prefix="")

    @classmethod
    def from_file(cls, path: str | Path) -> SimConfig:
        """Read a JSON (``.json``) or TOML (``.toml``) config file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings")
        return cls.from_dict(data)


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value, prefix=f"{key}.")
        else:
            kwargs[name] = _coerce(key, value, default)
    return cls(**kwargs)


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Coerce a JSON value to the type of the field's default, with a one-line error."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"config key {key} must be a finite number, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple) or not value:
            raise ConfigError(f"config key {key} must be a non-empty list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, default[0]) for i, v in enumerate(value))
    return value
