"""A precision config: which layers keep a higher precision than an export's low-precision
scheme. The sensitivity analysis (``calibration/sensitivity.py``) writes one; every exporter
takes it (``--precision-config F``), maps its layer names onto its own graph and records it in
the artifact's metadata.

One file, backend-neutral: layer names are the model's module names (``models/layers.py``), so
the same selection sets OpenVINO's ignored scope, TensorRT's Q/DQ placement, Core ML's per-op
weight configs, ExecuTorch's quantizer filter and LiteRT's recipe.

The JSON form::

    {"format": "lrformer-edge precision config", "version": 1,
     "variant": "lrformer-t.procedural", "checkpoint_sha256": "...", "input_size": [512, 512],
     "scheme": "int8",                                  # what every other layer gets
     "overrides": {"decode_head.conv_seg": "float",     # higher precision, layer by layer
                   "backbone.block1.0.mlp.fc2": "int8"},
     "selection": {...}}                                # how it was chosen (free-form, recorded)
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lrformer_edge.files import atomic_write

FORMAT = "lrformer-edge precision config"
VERSION = 1
FLOAT = "float"
# Low-precision schemes, lowest first: weights and activations int8 (every int8 backend), and the
# weight-only compressions of Core ML (4-bit linear, 4-bit palette).
SCHEMES = ("palette4", "weights-int4", "int8")
# A layer may be raised from its scheme to a later one here (never lowered).
PRECISION_ORDER = {"palette4": 0, "weights-int4": 1, "int8": 2, FLOAT: 3}
WEIGHT_ONLY_SCHEMES = ("palette4", "weights-int4")
METADATA_KEY = "precision_config"


class PrecisionConfigError(ValueError):
    """A precision config that cannot be read or does not fit the model or the export."""


@dataclass(frozen=True)
class PrecisionConfig:
    scheme: str
    overrides: Mapping[str, str] = field(default_factory=dict)
    variant: str | None = None
    checkpoint_sha256: str | None = None
    input_size: tuple[int, int] | None = None
    selection: Mapping = field(default_factory=dict)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise PrecisionConfigError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        for name, precision in self.overrides.items():
            if precision not in PRECISION_ORDER:
                raise PrecisionConfigError(
                    f"layer {name!r}: precision must be one of {tuple(PRECISION_ORDER)}, got "
                    f"{precision!r}")
            if PRECISION_ORDER[precision] <= PRECISION_ORDER[self.scheme]:
                raise PrecisionConfigError(
                    f"layer {name!r}: {precision!r} is not higher than the scheme "
                    f"{self.scheme!r}; an override raises a layer's precision")
        object.__setattr__(self, "overrides", dict(sorted(self.overrides.items())))
        if self.input_size is not None:
            object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))

    # ---------------------------------------------------------------- queries
    @property
    def float_layers(self) -> tuple[str, ...]:
        """Layers kept in float (the backend's float precision: fp32 or fp16)."""
        return tuple(name for name, p in self.overrides.items() if p == FLOAT)

    def precision_of(self, layer: str) -> str:
        return self.overrides.get(layer, self.scheme)

    def require_scheme(self, schemes: tuple[str, ...], export: str) -> None:
        """Refuse a config whose scheme or overrides an export cannot apply (``schemes``: what
        it can; ``export`` names it)."""
        used = {self.scheme, *self.overrides.values()} - {FLOAT}
        unsupported = sorted(used - set(schemes))
        if unsupported:
            raise PrecisionConfigError(
                f"{export} applies precision configs of scheme {' or '.join(schemes)} (and "
                f"'float' overrides); this one uses {', '.join(unsupported)}")

    def check_fits(self, model, input_size) -> None:
        """Refuse a config measured on another model, checkpoint or input size, or naming
        layers the model does not have: its sensitivities say nothing about another model."""
        from lrformer_edge.artifacts.metadata import checkpoint_record
        from lrformer_edge.models.layers import check_layer_names

        differences = []
        if self.variant and self.variant != model.config.name:
            differences.append(f"variant {self.variant} (exporting {model.config.name})")
        recorded = checkpoint_record(model)
        if self.checkpoint_sha256 and self.checkpoint_sha256 != recorded:
            differences.append(f"checkpoint {self.checkpoint_sha256[:16]}... (exporting "
                               f"{recorded[:16]}...)")
        if self.input_size and tuple(self.input_size) != tuple(input_size):
            differences.append(f"input size {self.input_size[0]}x{self.input_size[1]} "
                               f"(exporting {input_size[0]}x{input_size[1]})")
        if differences:
            raise PrecisionConfigError(
                f"this precision config was measured on another model: {'; '.join(differences)}. "
                f"Run calibration/sensitivity.py for the model and size you export")
        check_layer_names(model, self.overrides)

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "variant": self.variant,
                "checkpoint_sha256": self.checkpoint_sha256,
                "input_size": list(self.input_size) if self.input_size else None,
                "scheme": self.scheme, "overrides": dict(self.overrides),
                "selection": dict(self.selection)}

    @property
    def sha256(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def metadata(self) -> dict:
        """What an artifact records (under ``METADATA_KEY``)."""
        return {"scheme": self.scheme, "overrides": dict(self.overrides),
                "float_layers": list(self.float_layers), "sha256": self.sha256,
                "selection": dict(self.selection)}

    def save(self, path: str | Path) -> Path:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "precision config") -> PrecisionConfig:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise PrecisionConfigError(f"{source} is not a precision config: expected a JSON "
                                       f"object with \"format\": \"{FORMAT}\" (written by "
                                       f"calibration/sensitivity.py)")
        if data.get("version") != VERSION:
            raise PrecisionConfigError(f"{source} has version {data.get('version')!r}; this "
                                       f"toolkit reads version {VERSION}")
        overrides = data.get("overrides") or {}
        if not isinstance(overrides, Mapping):
            raise PrecisionConfigError(f"{source}: \"overrides\" must map layer names to "
                                       f"precisions, got {type(overrides).__name__}")
        try:
            return cls(scheme=data.get("scheme"), overrides=overrides,
                       variant=data.get("variant"),
                       checkpoint_sha256=data.get("checkpoint_sha256"),
                       input_size=data.get("input_size"),
                       selection=data.get("selection") or {})
        except PrecisionConfigError as error:
            raise PrecisionConfigError(f"{source}: {error}") from None

    @classmethod
    def load(cls, path: str | Path) -> PrecisionConfig:
        path = Path(path)
        if not path.is_file():
            raise PrecisionConfigError(f"precision config {path} does not exist (expected a "
                                       f"JSON file written by calibration/sensitivity.py)")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PrecisionConfigError(f"precision config {path} is not valid JSON: "
                                       f"{error}") from None
        return cls.from_dict(data, f"precision config {path}")


def checked_precision_config(config: PrecisionConfig | None, model, input_size,
                             schemes: tuple[str, ...], export: str) -> PrecisionConfig | None:
    """What every exporter does with a ``precision_config`` argument before any work: refuse one
    of a scheme it cannot apply or measured on another model (None passes through)."""
    if config is None:
        return None
    config.require_scheme(schemes, export)
    config.check_fits(model, input_size)
    return config
