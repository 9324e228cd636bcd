"""Quantization-aware training with NNCF, distilled from the FP32 model, exported by the backends.

1. The deploy form at the export size (default: the variant's native size) is quantized by NNCF
   post-training quantization (the starting point), with the quantizer rules of every backend
   the model is made for (``Backend.quantizer_rules``: TensorRT's per-tensor activations, which
   OpenVINO runs as well, so ``target="all"`` takes them). Weights keep the full 8-bit range when
   every target sums int8 products in 32 bits (``Backend.exact_int8_accumulation``: TensorRT
   alone); otherwise ``cpu_isa`` (default portable) sets their range as for PTQ
   (``lrformer_edge.backends.nncf_support.overflow_fix``): 7-bit weights unless the model is
   made for VNNI/AMX CPUs only.
2. Fine-tuning: the KL divergence to the FP32 teacher's softened logits (temperature ``T``,
   weight ``distill_weight``) plus, when ``task_weight`` > 0 (default 0: pure distillation, which
   keeps the model closest to the FP32 ground truth), cross-entropy on the labels; small learning
   rate, quantizer scales trainable, BatchNorm statistics and dropout frozen; mIoU on the
   validation split every ``val_interval`` iterations, the best kept.
3. Checkpoints hold the NNCF config and the state dict (``nncf.torch.load_from_config`` rebuilds
   the fake-quant model), optimizer and iteration: ``resume=True`` continues.
4. Export (``export_qat_artifacts``): each target backend's ``Backend.export_qat`` writes its
   ``qat_artifact_name`` into the work folder, checked against the fake-quant model.
Runs on one CPU, one GPU, or many processes under ``torchrun`` (DDP; gloo on CPU).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lrformer_edge.artifacts.optional import require
from lrformer_edge.artifacts.result import ExportResult, run_export_cli
from lrformer_edge.backends import BACKENDS, get_backend
from lrformer_edge.backends.base import Backend
from lrformer_edge.backends.nncf_support import overflow_fix, target_isa_settings
from lrformer_edge.cpu import resolve_int8_target
from lrformer_edge.data.calibration import (
    PROCEDURAL,
    QAT_CALIBRATION_IMAGES,
    build_calibration_set,
)
from lrformer_edge.data.datasets import IGNORE_INDEX, open_dataset
from lrformer_edge.files import atomic_write
from lrformer_edge.models.deploy import check_input_size, to_deploy
from lrformer_edge.models.factory import create_model
from lrformer_edge.progress import track
from lrformer_edge.registry import input_size_of
from lrformer_edge.training import (
    AugmentedSegmentation,
    DistInfo,
    StepClock,
    data_parallel,
    evaluate,
    finish_run,
    is_due,
    log_main,
    start_process,
    training_batches,
)

ALL_TARGETS = "all"  # every backend that exports QAT models, from one model
QAT_TARGETS = tuple(backend.name for backend in BACKENDS if backend.export_qat) + (ALL_TARGETS,)
# /2: the deploy form keeps NCHW maps and its pooling MatMuls stay float, so quantizers sit at
# other places than in /1 checkpoints, which cannot be restored onto it.
CHECKPOINT_FORMAT = "lrformer-edge-qat/2"
# Weights for targets that all sum int8 in 32 bits are made as for the first x86 ISA that does
# (full 8-bit range), and the artifacts record them so.
EXACT_ACCUMULATION_ISA = "vnni"


@dataclass
class QATConfig:
    data: str
    work_dir: str
    variant: str = "lrformer-t.procedural"
    checkpoint: str | None = None
    target: str = ALL_TARGETS
    cpu_isa: str | None = None  # x86 CPUs the OpenVINO INT8 model is for (default portable)
    input_size: tuple[int, int] | None = None  # default: the variant's native size
    iters: int = 300
    batch_size: int = 2  # per process
    lr: float = 1e-5
    weight_decay: float = 0.0
    distill_weight: float = 1.0
    # The FP32 model is the ground truth: by default the student follows it (distillation only).
    # A label loss (task_weight > 0) keeps training the model itself, and it drifts from FP32.
    task_weight: float = 0.0
    temperature: float = 2.0
    # Batches of 2 give noisy BatchNorm statistics and dropout moves the student away from the
    # FP32 model it is distilled from: by default both stay as in inference.
    update_bn_stats: bool = False
    val_interval: int = 100
    val_images: int = 50
    calib_images: int = QAT_CALIBRATION_IMAGES  # for the PTQ starting point (memory-bound)
    calib_source: str | None = None  # default: the training split of ``data``
    seed: int = 0
    resume: bool = False
    threads: int | None = None
    log_interval: int = 10
    extra: dict = field(default_factory=dict)


def _nncf():
    import logging

    # NNCF compiles its C++ extension on first use and gives up after 60 s by default, which a
    # loaded 2-core machine exceeds; a value the user set is kept.
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")
    nncf = require("nncf", "qat", "quantization-aware training")
    logging.getLogger("nncf").setLevel(logging.WARNING)
    return nncf


# ----------------------------------------------------------------------------- targets
def qat_backends(target: str) -> tuple[Backend, ...]:
    """The backends a QAT model for ``target`` is made for (``"all"``: every one that exports
    QAT models)."""
    if target not in QAT_TARGETS:
        raise ValueError(f"target must be one of {QAT_TARGETS}, got {target!r}")
    if target == ALL_TARGETS:
        return tuple(backend for backend in BACKENDS if backend.export_qat)
    return (get_backend(target),)


def qat_artifacts(work_dir: str | Path, target: str, variant: str) -> list[tuple[Backend, Path]]:
    """(backend, path) of each artifact the export of a QAT model for ``target`` writes."""
    return [(backend, Path(work_dir) / backend.qat_artifact_name.format(variant=variant))
            for backend in qat_backends(target)]


def weight_target_isa(backends: tuple[Backend, ...], cpu_isa: str | None) -> str:
    """The CPU ISA the QAT weights are made for: targets that all sum int8 in 32 bits need no
    x86 overflow fix; otherwise ``cpu_isa`` decides, as for PTQ."""
    if all(backend.exact_int8_accumulation for backend in backends):
        return EXACT_ACCUMULATION_ISA
    return resolve_int8_target(cpu_isa)


def quantizer_parameters(target: str, cpu_isa: str | None = None) -> dict:
    """Keyword arguments of ``nncf.quantize`` for ``target`` (the PTQ that initialises QAT)."""
    nncf = _nncf()
    backends = qat_backends(target)
    advanced = {"smooth_quant_alphas": nncf.AdvancedSmoothQuantParameters(matmul=-1,
                                                                          convolution=-1),
                "overflow_fix": overflow_fix(nncf, weight_target_isa(backends, cpu_isa)),
                **quantizer_rules(nncf, backends)}
    return {"model_type": nncf.ModelType.TRANSFORMER,
            "preset": nncf.QuantizationPreset.PERFORMANCE,
            "advanced_parameters": nncf.AdvancedQuantizationParameters(**advanced)}


def quantizer_rules(nncf, backends: tuple[Backend, ...]) -> dict:
    """What every target backend requires of the quantizers, together; backends that require
    different values of one setting cannot share a model."""
    rules: dict = {}
    for backend in backends:
        for name, value in (backend.quantizer_rules(nncf) if backend.quantizer_rules else
                            {}).items():
            if name in rules and rules[name] != value:
                raise ValueError(f"the QAT targets {', '.join(b.name for b in backends)} need "
                                 f"different quantizer settings ({name}): train one QAT model "
                                 f"per target")
            rules[name] = value
    return rules


# ----------------------------------------------------------------------------- the model
def quantize_for_training(model, input_size, calibration, target: str,
                          cpu_isa: str | None = None):
    """Deploy form of ``model`` at ``input_size`` -> NNCF fake-quant model (PTQ-initialised)."""
    nncf = _nncf()
    # NNCF quantizes kernels it sees as parameters, not the folded MLP kernels (see to_deploy).
    deployed = to_deploy(model, input_size, fold_mlp_residuals=False).eval()
    batches = [torch.from_numpy(b) for b in calibration.batches]
    ignored = nncf.IgnoredScope(names=_pooling_matmuls(deployed, batches[0]), validate=False)
    return nncf.quantize(deployed, nncf.Dataset(batches), subset_size=len(batches),
                         ignored_scope=ignored, **quantizer_parameters(target, cpu_isa))


def _pooling_matmuls(deployed, example) -> list[str]:
    """NNCF names of the MatMuls with a constant left operand (the deploy form's exact pooling).

    They stay float, as in the PTQ artifacts: averaging gains nothing from int8, and OpenVINO's
    CPU plugin cannot compile an int8 MatMul whose constant operand is on the left. NNCF's op
    names do not say which module ran them (blocks live in ModuleLists), so the graph is asked.
    """
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph

    graph = build_nncf_graph(deployed, example)
    return [node.node_name for node in graph.get_all_nodes() if node.node_type == "matmul"
            and any(edge.input_port_id == 0 and edge.from_node.node_type == "nncf_model_const"
                    for edge in graph.get_input_edges(node))]


def _freeze_normalization_and_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
            module.eval()


def restore(checkpoint_path: str | Path, map_location="cpu"):
    """(fake-quant model, checkpoint dict) from a QAT checkpoint written by ``train_qat``.

    The dict also holds, under ``"quantization"``, what its exported artifacts record of how
    the model was made (the ``payload`` every ``Backend.export_qat`` takes)."""
    _nncf()  # first: it configures NNCF
    from nncf.torch import load_from_config

    path = Path(checkpoint_path)
    if not path.is_file():
        raise ValueError(f"QAT checkpoint {path} does not exist")
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or not str(payload.get("format", "")).startswith(
            CHECKPOINT_FORMAT.split("/")[0] + "/"):
        raise ValueError(f"{path} is not a QAT checkpoint written by calibration/qat.py "
                         f"(expected format {CHECKPOINT_FORMAT})")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} was written by an older version of this toolkit (format "
                         f"{payload['format']}, this version reads {CHECKPOINT_FORMAT}); its "
                         f"quantizers do not fit the current deploy form: run calibration/qat.py "
                         f"again (or continue with the toolkit version that wrote it)")
    model = create_model(payload["variant"], pretrained=False)
    size = tuple(payload["input_size"])
    deployed = to_deploy(model, size, fold_mlp_residuals=False).eval()  # as trained
    quantized = load_from_config(deployed, payload["nncf_config"])
    quantized.load_state_dict(payload["state_dict"])
    quantized.config = model.config
    quantized.checkpoint_sha256 = payload.get("source_checkpoint_sha256")
    payload["quantization"] = _quantization_settings(payload)
    return quantized, payload


def _quantization_settings(payload: dict) -> dict:
    config = payload.get("config", {})
    # Checkpoints from before cpu_isa existed used NNCF's default: their target is unrecorded.
    isa = (target_isa_settings(weight_target_isa(qat_backends(payload.get("target")),
                                                 config["cpu_isa"]))
           if "cpu_isa" in config else {})
    return {"tool": f"nncf {_nncf().__version__} QAT (torch)", "target": payload.get("target"),
            **isa,
            "iterations": payload.get("iteration"), "best_val_mIoU": payload.get("best"),
            "lr": config.get("lr"), "distill_weight": config.get("distill_weight"),
            "task_weight": config.get("task_weight"),
            "temperature": config.get("temperature"), "format": "Q/DQ, int8, zero-point 0"}


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the per-pixel class distributions, scaled by T^2."""
    log_student = F.log_softmax(student / temperature, dim=1)
    log_teacher = F.log_softmax(teacher / temperature, dim=1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1).mean()
    return kl * temperature ** 2


# ----------------------------------------------------------------------------- training
@dataclass
class _QATRun:
    """A QAT run's state, shared by its steps."""

    config: QATConfig
    info: DistInfo
    device: torch.device
    work_dir: Path
    size: tuple[int, int]
    teacher_model: nn.Module  # the FP32 model as created (its config, its checkpoint's hash)
    teacher: nn.Module  # its deploy form at ``size``, frozen: what the student is distilled from
    train_set: object
    val_samples: list
    log: Callable
    student: nn.Module | None = None
    wrapped: nn.Module | None = None  # the student as trained (DDP-wrapped under torchrun)
    optimizer: torch.optim.Optimizer | None = None
    calibration: dict | None = None  # the description of the PTQ calibration set
    start: int = 0
    best: dict = field(default_factory=lambda: {"mIoU": -1.0, "iter": 0})
    history: list = field(default_factory=list)
    fp32: dict | None = None
    ptq: dict | None = None

    def say(self, message: str) -> None:
        log_main(self.info, message, self.log)

    def validation_metrics(self, model: nn.Module) -> dict:
        return evaluate(model, self.val_samples, self.teacher_model.config.data, self.device,
                        info=self.info, input_size=self.size)


def train_qat(config: QATConfig, log=print) -> dict:
    """Run QAT as ``config`` says; returns the summary (also written to WORK_DIR/summary.json)."""
    run = _setup(config, log)
    _start_student(run)
    _measure_baselines(run)
    data = run.teacher_model.config.data
    batches = training_batches(
        AugmentedSegmentation(run.train_set, data.mean, data.std, data.test_scale, run.size,
                              (0.75, 1.5), config.seed),
        config.batch_size, run.info, config.seed, run.start)
    run.say(f"QAT of {config.variant} at {run.size[0]}x{run.size[1]}: iterations "
            f"{run.start}..{config.iters}, batch {config.batch_size} x {run.info.world_size} "
            f"process(es), lr {config.lr}, task weight {config.task_weight}, distillation "
            f"weight {config.distill_weight} (T={config.temperature}), BatchNorm statistics "
            f"{'updated' if config.update_bn_stats else 'frozen'}")
    started, clock = time.time(), StepClock(config.iters)
    for iteration in track(range(run.start, config.iters), what="iterations", label="QAT"):
        losses = _train_step(run, next(batches))
        _after_step(run, iteration + 1, losses, clock)
    summary = {"variant": config.variant, "target": config.target, "iters": config.iters,
               "input_size": list(run.size), "fp32_mIoU": run.fp32["mIoU"],
               "ptq_mIoU": _miou(run.ptq), "best": run.best,
               "history": run.history, "minutes": (time.time() - started) / 60,
               "world_size": run.info.world_size, "calibration_set": run.calibration}
    return finish_run(run.info, run.work_dir, summary)


def _setup(config: QATConfig, log) -> _QATRun:
    """The process, the FP32 teacher at the QAT input size, the data and the work folder."""
    info, device = start_process(config.seed, config.threads)
    teacher_model = create_model(config.variant, checkpoint=config.checkpoint)
    size = check_input_size(input_size_of(teacher_model, config.input_size))
    train_set = open_dataset(config.data, "train")
    val_set = open_dataset(config.data, "val")
    work_dir = Path(config.work_dir)
    if info.is_main:  # only now: bad data or a bad checkpoint leave no empty work dir behind
        work_dir.mkdir(parents=True, exist_ok=True)
    teacher = to_deploy(teacher_model, size).eval().to(device)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    val_samples = [val_set[i] for i in range(min(config.val_images, len(val_set)))]
    return _QATRun(config, info, device, work_dir, size, teacher_model, teacher, train_set,
                   val_samples, log)


def _start_student(run: _QATRun) -> None:
    """The fake-quant student: resumed from WORK_DIR/latest.pth, or PTQ of the teacher; then
    its optimizer (with the resumed state) and the DDP wrapping."""
    config, latest, payload = run.config, run.work_dir / "latest.pth", None
    if config.resume and latest.is_file():
        run.student, payload = restore(latest)
        run.start, run.best = payload["iteration"], payload["best"]
        run.calibration = payload.get("calibration_set")
        run.ptq = payload.get("config", {}).get("extra", {}).get("ptq")
        run.say(f"resumed from {latest} at iteration {run.start}")
    else:
        calibration = build_calibration_set(config.calib_source or config.data,
                                            run.teacher_model.config.data, run.size,
                                            config.calib_images, config.seed)
        run.say(f"NNCF post-training quantization ({config.target} rules) on "
                f"{len(calibration.batches)} calibration images as the QAT starting point")
        run.student = quantize_for_training(run.teacher_model, run.size, calibration,
                                            config.target, config.cpu_isa)
        run.calibration = calibration.describe()
    run.student.to(run.device)
    run.optimizer = torch.optim.AdamW([p for p in run.student.parameters() if p.requires_grad],
                                      lr=config.lr, weight_decay=config.weight_decay)
    if payload is not None and payload.get("optimizer"):
        run.optimizer.load_state_dict(payload["optimizer"])
    run.wrapped = data_parallel(run.student, run.info, run.device)


def _measure_baselines(run: _QATRun) -> None:
    """FP32 and PTQ validation mIoU for the comparison with QAT; the PTQ figure is measured
    before any fine-tuning and kept in the checkpoints' config for resumed runs."""
    if run.start == 0:
        run.ptq = run.validation_metrics(run.student)
    run.fp32 = run.validation_metrics(run.teacher)
    run.config.extra["ptq"] = run.ptq
    if run.start == 0:
        run.say(f"validation mIoU before QAT: FP32 {_percent(run.fp32['mIoU'])}, "
                f"PTQ INT8 {_percent(_miou(run.ptq))}")


def _miou(metrics: dict | None) -> float | None:
    """A resumed run of an older checkpoint may not know its PTQ figure."""
    return metrics["mIoU"] if metrics else None


def _percent(miou: float | None) -> str:
    return "n/a" if miou is None else f"{100 * miou:.2f}"


def _train_step(run: _QATRun, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One distillation step; returns (loss, task loss, distillation loss)."""
    config = run.config
    run.student.train()
    if not config.update_bn_stats:
        _freeze_normalization_and_dropout(run.student)
    images, labels = (tensor.to(run.device) for tensor in batch)
    with torch.no_grad():
        soft = run.teacher(images)
    logits = run.wrapped(images)
    task = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    distill = distillation_loss(logits, soft, config.temperature)
    loss = config.task_weight * task + config.distill_weight * distill
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    return loss, task, distill


def _after_step(run: _QATRun, done: int, losses, clock: StepClock) -> None:
    config = run.config
    if is_due(done, config.log_interval, config.iters):
        loss, task, distill = (value.item() for value in losses)
        run.say(f"iter {done}/{config.iters}  loss {loss:.4f} (task {task:.4f}, "
                f"distill {distill:.4f})  {clock.lap(done, config.log_interval)}")
    if is_due(done, config.val_interval, config.iters):
        _validate(run, done)


def _validate(run: _QATRun, done: int) -> None:
    """Validation mIoU; the best model goes to WORK_DIR/best.pth, every state to latest.pth."""
    metrics = run.validation_metrics(run.student)
    run.history.append({"iter": done, "mIoU": metrics["mIoU"]})
    run.say(f"iter {done}: val mIoU {_percent(metrics['mIoU'])} (FP32 "
            f"{_percent(run.fp32['mIoU'])}, PTQ {_percent(_miou(run.ptq))})")
    if metrics["mIoU"] > run.best["mIoU"]:
        run.best = {"mIoU": metrics["mIoU"], "iter": done}
        if run.info.is_main:
            _save(run, run.work_dir / "best.pth", done, with_optimizer=False)
    if run.info.is_main:
        _save(run, run.work_dir / "latest.pth", done, with_optimizer=True)


def _save(run: _QATRun, path: Path, iteration: int, with_optimizer: bool) -> None:
    import nncf.torch

    config = run.config
    payload = {"format": CHECKPOINT_FORMAT, "variant": config.variant,
               "input_size": list(run.size), "target": config.target,
               "nncf_config": nncf.torch.get_config(run.student),
               "state_dict": run.student.state_dict(),
               "optimizer": run.optimizer.state_dict() if with_optimizer else None,
               "iteration": iteration, "best": run.best, "config": asdict(config),
               "source_checkpoint_sha256": getattr(run.teacher_model, "checkpoint_sha256", None),
               "calibration_set": run.calibration}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


# ----------------------------------------------------------------------------- exports
def export_qat_artifacts(work_dir: str | Path, target: str) -> list[ExportResult]:
    """Each target backend's artifact of WORK_DIR/best.pth, written into WORK_DIR."""
    quantized, payload = restore(Path(work_dir) / "best.pth")
    feed = export_feed(quantized, payload)
    return [backend.export_qat(quantized, payload, path, feed)
            for backend, path in qat_artifacts(work_dir, target, payload["variant"])]


def export_feed(quantized, payload: dict) -> np.ndarray:
    """The image an export of a restored QAT model is checked on: a procedural scene, fixed."""
    return build_calibration_set(PROCEDURAL, quantized.config.data,
                                 tuple(payload["input_size"]), 1, seed=123).batches[0]


def run_qat(config: QATConfig, export: bool = True, log=print) -> int:
    """``calibration/qat.py``: train, then export the best model (main process); the exit code.
    Bad input gives one line on stderr and 2, a failed export check 1 (nothing written)."""
    code, summary = run_export_cli(lambda: train_qat(config, log))
    if code or int(os.environ.get("RANK", "0")) != 0:
        return code
    best = summary["best"]
    log(f"best validation mIoU {_percent(best['mIoU'])} at iteration {best['iter']} (FP32 "
        f"{_percent(summary['fp32_mIoU'])}, PTQ {_percent(summary['ptq_mIoU'])}); "
        f"{summary['minutes']:.1f} min")
    if not export:
        return 0
    code, results = run_export_cli(lambda: export_qat_artifacts(config.work_dir, config.target))
    for result in results or []:
        log(result.summary().replace("parity vs PyTorch", "parity vs the QAT fake-quant model"))
    if results:
        exports = [{"path": str(r.path), "parity_vs_qat_model": r.parity.as_dict()}
                   for r in results]
        atomic_write(Path(config.work_dir) / "exports.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(exports, indent=1)))
    return code
