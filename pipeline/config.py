"""Typed, validated configuration of the toy detector and of the simulated events.

The configuration lives in ``pipeline`` because it is part of the data contract: the simulation writes it
into every dataset (manifest and Parquet key-value metadata) and the model reads the geometry back from the
dataset (layer positions, pitch, field), so neither package has to import the other.

Units: mm, GeV, tesla, radians. Layers are planes at fixed ``y``; strips measure ``x``; the field is along
``z``. With ``B > 0`` a positive muon moving towards ``+y`` bends towards ``+x``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pipeline.errors import ConfigError

T = TypeVar("T")

#: pT [GeV] = PT_PER_TESLA_METRE * B [T] * R [m]
PT_PER_TESLA_METRE = 0.299792458


#: the config files' sections (see :func:`read_config_file`)
CONFIG_SECTIONS = ("simulation", "model", "train")

#: pydantic's settings for every config dataclass (read by :func:`load_config`): no unknown key, no type
#: coercion (``"0.5"`` is not a number, ``1.0`` not an integer, ``1`` not a boolean), no NaN or infinity
STRICT: dict[str, Any] = {"extra": "forbid", "strict": True, "allow_inf_nan": False}


def check(condition: bool, message: str) -> None:
    """A config dataclass's domain rule (its ``__post_init__``): ConfigError ``message`` unless ``condition``."""
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class DetectorConfig:
    """Geometry and response of the strip detector (its defaults: docs/detector.md)."""

    __pydantic_config__ = STRICT

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
    #: electronic noise: the Gaussian sigma added to every strip's charge, in units of ``charge_mean`` (0: none).
    #: Strips no particle touched fire where their noise alone crosses the threshold
    electronic_noise: float = 0.0
    #: cross-talk: the fraction of a strip's charge that each of its two neighbours picks up, before the noise
    crosstalk: float = 0.0

    def __post_init__(self) -> None:
        check(len(self.layers_per_station) >= 1, "detector.layers_per_station must not be empty")
        check(all(n >= 1 for n in self.layers_per_station), "detector.layers_per_station entries must be >= 1")
        check(
            len(self.station_y) == len(self.layers_per_station),
            "detector.station_y needs one entry per station in detector.layers_per_station",
        )
        check(self.layer_spacing > 0, "detector.layer_spacing must be > 0 mm")
        check(self.x_max > self.x_min, "detector.x_max must be greater than detector.x_min")
        check(self.pitch > 0, "detector.pitch must be > 0 mm")
        check(self.b_field > 0, "detector.b_field must be > 0 T")
        check(self.charge_sigma_pitch > 0, "detector.charge_sigma_pitch must be > 0")
        check(self.charge_mean > 0, "detector.charge_mean must be > 0")
        check(self.charge_rms >= 0, "detector.charge_rms must be >= 0")
        check(0 < self.threshold < 1, "detector.threshold must be in (0, 1) (a fraction of charge_mean)")
        check(self.x_over_x0 >= 0, "detector.x_over_x0 must be >= 0")
        check(self.electronic_noise >= 0, "detector.electronic_noise must be >= 0 (a fraction of charge_mean)")
        check(
            self.electronic_noise == 0 or self.threshold >= 2 * self.electronic_noise,
            "detector.threshold must be at least 2 x detector.electronic_noise (a lower one fires every strip "
            "about as often as a clean cluster's)",
        )
        check(0 <= self.crosstalk < 1 / 3, "detector.crosstalk must be in [0, 1/3) (a strip keeps 1 - 2 x crosstalk)")
        ys = self.layer_y()
        check(bool(np.all(np.diff(ys) > 0)), "detector stations overlap: layer y positions must increase")
        # the hits table's integer columns (pipeline.schema): strip int32, layer int16
        check(
            self.n_strips < 2**31,
            f"detector.x_max - detector.x_min over detector.pitch gives {self.n_strips:.3g} strips per layer; the "
            "strip column holds at most 2**31 - 1",
        )
        check(self.n_layers < 2**15, f"the detector has {self.n_layers} layers; the layer column holds at most 32767")

    @property
    def n_layers(self) -> int:
        return int(sum(self.layers_per_station))

    @property
    def n_strips(self) -> int:
        return math.floor((self.x_max - self.x_min) / self.pitch)

    @property
    def threshold_in_noise_sigmas(self) -> float:
        """The threshold in units of the electronic noise (infinite without noise)."""
        return self.threshold / self.electronic_noise if self.electronic_noise > 0 else math.inf

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


#: detector fields added after the first dataset format: written into a config (hence its hash) only when not 0,
#: so the configs that do not use them keep the identity their datasets and runs were made with
_DETECTOR_FIELDS_OMITTED_AT_ZERO = ("electronic_noise", "crosstalk")

#: the named detectors, usable as ``simulation.detector = "NAME"`` in a config file:
#: - ``default``: the paper's layout with an ideal readout (no electronic noise; a clean cluster's charge
#:   centroid resolves 5 um, the strip-sampling bias of the Gaussian charge cloud);
#: - ``realistic``: the same layout with electronic noise of 0.065 x the mean cluster charge per strip, the
#:   threshold at 3.5 sigma of it (0.47 noise-only strips per layer) and 5 % cross-talk, chosen so that a clean
#:   perpendicular cluster's centroid resolves about 100 um, as the Micromegas of the ATLAS New Small Wheel that
#:   the layout follows (measured figures: docs/detector.md)
DETECTORS: dict[str, DetectorConfig] = {
    "default": DetectorConfig(),
    "realistic": DetectorConfig(electronic_noise=0.065, threshold=0.2275, crosstalk=0.05),
}


#: the clean-cluster charge-centroid resolution of each named detector [mm]: the RMS of the centroid residuals
#: of the muon's clusters that no other particle or noise strip touches, measured on 5000 events of seed 0 with
#: the default background (``python -m benchmarks.limit --data D``: rms_mm; 5.17 um on 20k events for the
#: default). The point error of the scattering-aware fits (model.tracker, classical.reco)
POINT_RESOLUTION: dict[str, float] = {"default": 0.0052, "realistic": 0.0966}


def detector_name(detector: DetectorConfig) -> str:
    """The name under which :data:`DETECTORS` holds ``detector``, else ``"custom"``."""
    return next((name for name, known in DETECTORS.items() if known == detector), "custom")


def point_resolution(detector: DetectorConfig) -> float:
    """The charge-centroid resolution [mm] the fits assume for ``detector``: :data:`POINT_RESOLUTION` for a named
    detector, else the estimate of pipeline.resolution (isolated perpendicular clusters, Monte Carlo)."""
    name = detector_name(detector)
    if name in POINT_RESOLUTION:
        return POINT_RESOLUTION[name]
    from pipeline.resolution import estimated_point_resolution

    return estimated_point_resolution(detector)


def detector_material(detector: DetectorConfig) -> dict[str, float]:
    """``b_field``, ``x_over_x0`` (0 without multiple scattering), ``x_min``, ``x_max`` of ``detector``: the
    keyword arguments that describe its material and field to both scattering-aware fits
    (model.scattering_fit.scattering_fit, classical.gbl.fit_tracks)."""
    return {
        "b_field": float(detector.b_field),
        "x_over_x0": float(detector.x_over_x0) if detector.multiple_scattering else 0.0,
        "x_min": float(detector.x_min),
        "x_max": float(detector.x_max),
    }


@dataclass(frozen=True)
class MuonConfig:
    """The signal muon: one per event, entering station 1."""

    __pydantic_config__ = STRICT

    pt_min: float = 20.0
    pt_max: float = 50.0
    #: Gaussian spread of the muon's x at the first layer [mm]
    x0_sigma: float = 100.0
    #: Gaussian spread of the muon's angle to the y axis at the first layer [rad]
    theta0_sigma: float = 0.05

    def __post_init__(self) -> None:
        check(self.pt_min > 0, "muon.pt_min must be > 0 GeV")
        check(self.pt_max > self.pt_min, "muon.pt_max must be greater than muon.pt_min (pT range reversed?)")
        check(self.x0_sigma >= 0, "muon.x0_sigma must be >= 0 mm")
        check(0 <= self.theta0_sigma < 0.5, "muon.theta0_sigma must be in [0, 0.5) rad")


@dataclass(frozen=True)
class BackgroundConfig:
    """Noise and extra tracks. Defaults give roughly as many background as signal hits."""

    __pydantic_config__ = STRICT

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
        check(self.noise_strips_per_layer >= 0, "background.noise_strips_per_layer must be >= 0")
        check(self.noise_clusters_per_layer >= 0, "background.noise_clusters_per_layer must be >= 0")
        check(self.extra_tracks_per_event >= 0, "background.extra_tracks_per_event must be >= 0")
        check(self.extra_track_pt_min > 0, "background.extra_track_pt_min must be > 0 GeV")
        check(
            self.extra_track_pt_max >= self.extra_track_pt_min,
            "background.extra_track_pt_max must be >= background.extra_track_pt_min",
        )
        check(self.extra_track_layers_min >= 1, "background.extra_track_layers_min must be >= 1")
        check(
            self.extra_track_layers_max >= self.extra_track_layers_min,
            "background.extra_track_layers_max must be >= background.extra_track_layers_min",
        )
        check(self.extra_track_spread >= 0, "background.extra_track_spread must be >= 0 mm")


@dataclass(frozen=True)
class SimConfig:
    """Everything that determines the rows of a dataset (together with the seed)."""

    __pydantic_config__ = STRICT

    detector: DetectorConfig = field(default_factory=DetectorConfig)
    muon: MuonConfig = field(default_factory=MuonConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    #: events per Parquet shard (a unit of work, of resume and of memory)
    shard_events: int = 20_000

    def __post_init__(self) -> None:
        check(self.shard_events >= 1, "shard_events must be >= 1")

    # ---- (de)serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in _DETECTOR_FIELDS_OMITTED_AT_ZERO:
            if data["detector"][key] == 0:
                del data["detector"][key]
        return data

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
    def from_dict(cls, data: dict[str, Any], prefix: str = "", base: SimConfig | None = None) -> SimConfig:
        """Build from a (possibly partial) nested dict: missing keys take ``base``'s values (the defaults without
        it), unknown keys and wrong types are ConfigErrors naming the key (``prefix.detector.pitch``).
        ``detector`` may be the name of one of :data:`DETECTORS`."""
        if isinstance(data, dict) and isinstance(data.get("detector"), str):
            name = data["detector"]
            if name not in DETECTORS:
                key = f"{prefix}.detector" if prefix else "detector"
                raise ConfigError(f"config key {key}: unknown detector {name!r} (known: {', '.join(DETECTORS)})")
            data = {**data, "detector": dataclasses.asdict(DETECTORS[name])}
        return load_config(cls, data, prefix, base)

    @classmethod
    def from_file(cls, path: str | Path, base: SimConfig | None = None) -> SimConfig:
        """The ``simulation`` section of a config file (:func:`read_config_file`) applied over ``base`` (or the
        defaults); its ``model`` and ``train`` sections are for training."""
        return cls.from_dict(read_config_file(path).get("simulation", {}), "simulation", base)


def read_config_file(path: str | Path, sections: tuple[str, ...] = CONFIG_SECTIONS) -> dict[str, dict[str, Any]]:
    """Read a config file, JSON (``.json``, or any other suffix) or TOML (``.toml``): a mapping of optional
    sections ``simulation`` (SimConfig's fields: detector, muon, background, shard_events), ``model`` and
    ``train`` (ModelConfig's and TrainConfig's fields, model.hyperparameters.configure). Each section holds only the
    values to change; ``sections`` names the sections the command reads (``muontrack scan`` adds ``scan``).
    Returns the sections found, not yet validated (:func:`load_config` does)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, TypeError) as err:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"config file {path} is not valid {kind}: {message}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections ({', '.join(sections)})")
    sim_keys = {f.name for f in dataclasses.fields(SimConfig)}
    for key, value in data.items():
        if key in sim_keys:
            raise ConfigError(
                f"config key {key} of {path} belongs in the simulation section ([simulation.{key}] in TOML, "
                f'{{"simulation": {{"{key}": ...}}}} in JSON)'
            )
        if key not in sections:
            raise ConfigError(f"unknown config key {key} in {path} (known sections: {', '.join(sections)})")
        if not isinstance(value, dict):
            raise ConfigError(f"config section {key} must be a mapping of keys to values, got {value!r}")
    return data


def load_config(cls: type[T], data: Any, prefix: str = "", base: T | None = None) -> T:
    """Build the config dataclass ``cls`` from a JSON-like mapping ``data`` (lists for tuples), validated by
    pydantic against the dataclass's field types (``STRICT``), then by its ``__post_init__`` (domain rules).

    ``data`` may be partial: its keys replace ``base``'s values (nested sections key by key), and with no
    ``base`` the missing keys take the dataclass's defaults. The first unknown key, wrong type or missing
    required key becomes a one-line ConfigError naming its full key path, ``prefix`` first
    (``unknown config key train.epohcs``, ``config key detector.pitch must be a number, got 'abc'``).
    The result is the plain dataclass, equal to one built by hand with the same values.
    """
    section = prefix or "<root>"
    if not isinstance(data, dict):
        raise ConfigError(f"config section {section} must be a mapping of keys to values, got {data!r}")
    if base is not None:
        data = merged_sections(dataclasses.asdict(base), data)  # type: ignore[call-overload]
    import pydantic

    try:
        # JSON mode: lists are accepted for tuples (strict Python mode wants tuples); default=str turns a TOML
        # date into a string, so it fails the field's type check instead of the serialisation
        return _adapter(cls).validate_json(json.dumps(data, default=str))
    except pydantic.ValidationError as err:
        raise ConfigError(_describe(cls, err.errors()[0], prefix)) from None


def merged_sections(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides``' values, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merged_sections(merged[key], value)
        else:
            merged[key] = value
    return merged


@functools.cache
def _adapter(cls: type) -> Any:
    import pydantic

    return pydantic.TypeAdapter(cls)


_EXPECTED = {
    "float": "a number",
    "finite": "a finite number",
    "int": "an integer",
    "bool": "true or false",
    "string": "a string",
    "tuple": "a list",
    "list": "a list",
}


def _describe(cls: type, error: dict[str, Any], prefix: str) -> str:
    """One line for pydantic's ``error``, with the dotted key path (``prefix.detector.station_y[1]``)."""
    path, owner, known = prefix, cls, None
    for part in error["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        path = f"{path}.{part}" if path else str(part)
        fields = {f.name: f for f in dataclasses.fields(owner)} if dataclasses.is_dataclass(owner) else {}
        known = sorted(fields)
        hint = typing.get_type_hints(owner).get(part) if part in fields else None
        owner = hint if dataclasses.is_dataclass(hint) else None
    kind, value = error["type"], error.get("input")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"unknown config key {path} (known: {', '.join(known or [])})"
    if kind in ("missing", "missing_keyword_argument", "missing_argument"):
        return f"config key {path} is missing (it has no default)"
    if kind in ("dataclass_type", "dataclass_exact_type", "dict_type", "model_type"):
        return f"config section {path or '<root>'} must be a mapping of keys to values, got {value!r}"
    expected = _EXPECTED.get("finite" if kind == "finite_number" else kind.split("_")[0])
    if expected is not None:
        return f"config key {path} must be {expected}, got {value!r}"
    return f"config key {path}: {error['msg'].lower()}, got {value!r}"
