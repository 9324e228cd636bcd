"""The ``Backend`` record: everything the toolkit needs to know about one deployment target,
declared as data (registered like the model variants, timm style).

A backend's folder (``lrformer_edge/backends/<name>/``) holds its exporter, quantization, runner
and format readers; its ``__init__.py`` builds one ``Backend`` record from them, and
``lrformer_edge/backends/__init__.py`` registers it. Everything above the backends (the
validation harness, the benchmark, QAT, the CLIs, the camera demo) asks the registry and never
matches a backend's name itself.

SDKs are imported only inside the functions a record points to, so importing the registry is
cheap and works where a backend's SDK is missing.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrformer_edge.artifacts.runner import Runner


@dataclass(frozen=True)
class RuntimeOption:
    """An option of a backend's runner that the CLIs offer (e.g. OpenVINO's precision hint).

    ``choices`` of ``(False, True)`` make a switch; ``flag`` is its command-line spelling
    (default ``--<backend>-<name>`` with dashes)."""

    name: str
    choices: tuple
    default: Any
    help: str
    flag: str | None = None

    @property
    def is_switch(self) -> bool:
        return tuple(self.choices) == (False, True)


@dataclass(frozen=True)
class ArtifactDescription:
    """What an artifact is, read without running it."""

    backend: str
    precision: str  # the gate's precision key, e.g. "int8", "int8+bf16", "fp16+palette4"
    runner_options: Mapping = field(default_factory=dict)  # for ``Backend.open_runner``
    metadata: Mapping | None = None  # what it embeds (None: a PyTorch checkpoint)


def _always_available() -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One deployment target. Functions are plain callables (their SDK imports are lazy):

    * ``open_runner(path, variant=None, **options) -> Runner``: ``variant`` is the registry
      variant to assume where the artifact records none; one that contradicts the artifact's own
      is a ValueError (``check_variant_matches``).
    * ``describe(path, options) -> ArtifactDescription``: ``options`` are the values of
      ``runtime_options`` by name (defaults filled in).
    * ``export(model, output, input_size=None, precision=..., calibration=None, **kw)
      -> ExportResult`` (None: nothing to export, e.g. PyTorch).
    * ``quantize``: the post-training quantizer the exporter uses for int8 (None: no int8).
    * ``export_qat(quantized, payload, output, feed) -> ExportResult``: a QAT model's artifact.
    * ``quantizer_rules(nncf) -> dict``: keyword arguments of
      ``nncf.AdvancedQuantizationParameters`` that this backend's int8 kernels require (e.g.
      per-tensor activation scales); the QAT starting point takes those of every backend it is
      made for.
    * ``benchmark_candidates(context) -> list[Candidate]`` (``lrformer_edge.benchmark``).
    * ``precision_schemes``: the low-precision schemes of a precision config
      (``artifacts/precision_config.py``) this backend's exporter applies, e.g. ("int8",).
    * ``export_mixed(model, work_dir, input_size, precision_config, calibration) ->
      ExportResult``: the artifact of ``precision_config`` (its scheme, its overrides), written
      into the folder ``work_dir`` under a name the backend chooses; ``calibration`` is None
      for weight-only schemes. The sensitivity front (``validation/front.py``) calls it.
    * ``proxy_model(model, path, calibration) -> torch.nn.Module``: where artifacts cannot run
      here (Core ML off macOS), a PyTorch model computing what the artifact computes (its
      weights read back from it), measured in its place.
    * ``weight_bytes(layers, precision_of) -> int``: for a backend that stores layer weights in
      a form of its own (Core ML's palettes), the bytes the weights of ``layers``
      (``models.layers.Layer``) take in its artifact when layer ``name`` has
      ``precision_of(name)``; ``keeps_float(layer, precision) -> bool``: whether it leaves that
      layer's weight uncompressed at ``precision``. The sensitivity analysis sizes artifacts by
      the one and leaves float in its simulation what the other says (``quant/fake_quant.py``).
    """

    name: str
    title: str
    suffixes: tuple[str, ...]
    precisions: tuple[str, ...]
    precision_keys: tuple[str, ...]
    extra: str | None
    open_runner: Callable[..., Runner]
    describe: Callable[[Path, Mapping], ArtifactDescription]
    recognises: Callable[[Path], bool] | None = None  # beyond the suffix, e.g. an IR folder
    artifact_form: str | None = None  # the artifact in words where suffixes are not all of it
    runtime_options: tuple[RuntimeOption, ...] = ()
    unavailable_reason: Callable[[], str | None] = _always_available
    export: Callable | None = None
    quantize: Callable | None = None
    export_qat: Callable | None = None
    qat_artifact_name: str | None = None  # file or folder name of the QAT export, {variant}
    quantizer_rules: Callable[[Any], dict] | None = None
    benchmark_candidates: Callable | None = None
    precision_schemes: tuple[str, ...] = ()
    export_mixed: Callable | None = None
    proxy_model: Callable | None = None
    weight_bytes: Callable[[Iterable, Callable[[str], str]], int] | None = None
    keeps_float: Callable[[Any, str], bool] | None = None
    # GPUs and NPUs sum int8 products in 32 bits; x86 CPUs without VNNI saturate 16-bit sums,
    # so INT8 weights for them are made 7-bit (``lrformer_edge.cpu``).
    exact_int8_accumulation: bool = True
    thresholds_key: str | None = None  # default: ``name``

    def __post_init__(self):
        object.__setattr__(self, "runtime_options", tuple(self.runtime_options))

    @property
    def gate_key(self) -> str:
        return self.thresholds_key or self.name

    def runs(self, path: Path) -> bool:
        """Whether ``path`` is an artifact of this backend."""
        path = Path(path)
        if path.suffix in self.suffixes:
            return True
        return bool(self.recognises and self.recognises(path))

    def option_defaults(self) -> dict:
        return {option.name: option.default for option in self.runtime_options}

    def option_flag(self, option: RuntimeOption) -> str:
        return option.flag or f"--{self.name}-{option.name.replace('_', '-')}"

    @property
    def artifact_kind(self) -> str:
        """For messages: "OpenVINO IR (.xml, or the folder holding one)"."""
        return f"{self.title} ({self.artifact_form or ', '.join(self.suffixes)})"

    def install_hint(self) -> str:
        return (f"pip install 'lrformer-edge[{self.extra}]'" if self.extra
                else "pip install lrformer-edge")


def check_variant_matches(path: Path, asked: str | None, recorded: str | None) -> None:
    if asked and recorded and asked != recorded:
        raise ValueError(f"variant {asked} was asked for, but {path} records variant "
                         f"{recorded}: leave the variant out or name {recorded}")


def variant_checked(runner_class: Callable[..., Runner]) -> Callable[..., Runner]:
    """``open_runner`` for a backend whose artifacts record their variant: a ``variant`` that is
    given must be the recorded one."""
    def open_runner(path: Path, variant: str | None = None, **options) -> Runner:
        runner = runner_class(path, **options)
        if variant is not None:
            check_variant_matches(path, variant, runner.metadata.get("variant"))
        return runner

    return open_runner


@dataclass
class BenchmarkContext:
    """What ``benchmark_candidates`` gets: the model and how the benchmark was asked to run."""

    model: Any
    input_size: tuple[int, int]
    work_dir: Path
    calibration: Callable  # () -> CalibrationSet, built once on first use
    threads: int | None
    all_formats: bool  # --all: every format, not only the CPU formats of the default table
    int8_targets: tuple[str, ...]  # x86 ISAs to make CPU INT8 artifacts for (lrformer_edge.cpu)
    # (path, **options) -> Runner of the backend that runs ``path`` (the registry's load_runner):
    # for an artifact another backend runs, e.g. the TensorRT ONNX run by ONNX Runtime here.
    open_runner: Callable
    log: Callable = print


@dataclass
class Candidate:
    """One row of the benchmark: an artifact and how to run it (or why it cannot run here)."""

    format: str
    backend: str
    precision: str
    make_runner: Callable | None = None  # () -> Runner; None when skipped
    artifact: Path | None = None
    status: str = "ok"
    throughput: bool = False  # also measure the runner's own throughput mode
