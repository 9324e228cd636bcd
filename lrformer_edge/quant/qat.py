"""Quantization-aware training with NNCF, distilled from the FP32 model.

1. The deploy form at the export size is quantized by NNCF post-training quantization (the
   starting point); ``target="tensorrt"`` or ``"all"`` uses the quantizer rules TensorRT takes
   (symmetric int8, per-channel weights, per-tensor activations), which OpenVINO runs as well;
   ``"openvino"`` keeps NNCF's CPU defaults. ``cpu_isa`` (default portable) sets the weight range
   as for PTQ (``lrformer_edge.backends.nncf_support.overflow_fix``): 7-bit weights unless the OpenVINO
   model is made for VNNI/AMX CPUs only; ``target="tensorrt"`` alone keeps full 8-bit weights
   (GPUs accumulate int8 in 32 bits).
2. Fine-tuning: the KL divergence to the FP32 teacher's softened logits (temperature ``T``,
   weight ``distill_weight``) plus, when ``task_weight`` > 0 (default 0: pure distillation, which
   keeps the model closest to the FP32 ground truth), cross-entropy on the labels; small learning
   rate, quantizer scales trainable, BatchNorm statistics and dropout frozen; mIoU on the
   validation split every ``val_interval`` iterations, the best kept.
3. Checkpoints hold the NNCF config and the state dict (``nncf.torch.load_from_config`` rebuilds
   the fake-quant model), optimizer and iteration: ``resume=True`` continues.
Runs on one CPU, one GPU, or many processes under ``torchrun`` (DDP; gloo on CPU).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lrformer_edge.artifacts.optional import require
from lrformer_edge.cpu import int8_mismatch
from lrformer_edge.data.datasets import IGNORE_INDEX

QAT_TARGETS = ("openvino", "tensorrt", "all")
# /2: the deploy form keeps NCHW maps and its pooling MatMuls stay float, so quantizers sit at
# other places than in /1 checkpoints, which cannot be restored onto it.
CHECKPOINT_FORMAT = "lrformer-edge-qat/2"


@dataclass
class QATConfig:
    data: str
    work_dir: str
    variant: str = "lrformer-t.procedural"
    checkpoint: str | None = None
    target: str = "all"
    cpu_isa: str | None = None  # x86 CPUs the OpenVINO INT8 model is for (default portable)
    input_size: tuple[int, int] = (512, 512)
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
    calib_images: int = 64  # PTQ initialisation only (NNCF torch keeps statistics in memory)
    calib_source: str | None = None  # default: the training split of --data
    seed: int = 0
    resume: bool = False
    threads: int | None = None
    log_interval: int = 10
    extra: dict = field(default_factory=dict)


def _nncf():
    import logging
    import os

    # NNCF compiles its C++ extension on first use and gives up after 60 s by default, which a
    # loaded 2-core machine exceeds; a value the user set is kept.
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")
    nncf = require("nncf", "qat", "quantization-aware training")
    logging.getLogger("nncf").setLevel(logging.WARNING)
    return nncf


def weight_target_isa(target: str, cpu_isa: str | None) -> str:
    """The CPU ISA the QAT weights are made for: TensorRT alone needs no x86 overflow fix."""
    from lrformer_edge.cpu import resolve_int8_target

    return "vnni" if target == "tensorrt" else resolve_int8_target(cpu_isa)


def quantizer_parameters(target: str, cpu_isa: str | None = None) -> dict:
    """Keyword arguments of ``nncf.quantize`` for ``target`` (the PTQ that initialises QAT)."""
    from lrformer_edge.backends.nncf_support import overflow_fix

    nncf = _nncf()
    if target not in QAT_TARGETS:
        raise ValueError(f"target must be one of {QAT_TARGETS}, got {target!r}")
    advanced = {"smooth_quant_alphas": nncf.AdvancedSmoothQuantParameters(matmul=-1,
                                                                          convolution=-1),
                "overflow_fix": overflow_fix(nncf, weight_target_isa(target, cpu_isa))}
    if target in ("tensorrt", "all"):
        advanced["activations_quantization_params"] = (
            nncf.quantization.advanced_parameters.QuantizationParameters(per_channel=False))
    return {"model_type": nncf.ModelType.TRANSFORMER,
            "preset": nncf.QuantizationPreset.PERFORMANCE,
            "advanced_parameters": nncf.AdvancedQuantizationParameters(**advanced)}


def quantize_for_training(model, input_size, calibration, target: str,
                          cpu_isa: str | None = None):
    """Deploy form of ``model`` at ``input_size`` -> NNCF fake-quant model (PTQ-initialised)."""
    from lrformer_edge.models.deploy import to_deploy

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
    """(fake-quant model, checkpoint dict) from a QAT checkpoint written by ``train_qat``."""
    from lrformer_edge.models.deploy import to_deploy
    from lrformer_edge.models.factory import create_model

    _nncf()
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
    return quantized, payload


def _save(path: Path, model, optimizer, iteration: int, best: dict, config: QATConfig,
          variant: str, source_sha: str | None, calibration: dict) -> None:
    import nncf.torch

    from lrformer_edge.files import atomic_write

    payload = {"format": CHECKPOINT_FORMAT, "variant": variant,
               "input_size": list(config.input_size), "target": config.target,
               "nncf_config": nncf.torch.get_config(model), "state_dict": model.state_dict(),
               "optimizer": optimizer.state_dict() if optimizer is not None else None,
               "iteration": iteration, "best": best, "config": asdict(config),
               "source_checkpoint_sha256": source_sha, "calibration_set": calibration}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the per-pixel class distributions, scaled by T^2."""
    log_student = F.log_softmax(student / temperature, dim=1)
    log_teacher = F.log_softmax(teacher / temperature, dim=1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1).mean()
    return kl * temperature ** 2


def evaluate_fixed_size(model, samples, data_config, input_size, info=None) -> dict:
    """mIoU through the common pipeline at the model's fixed input size (sharded under DDP)."""
    from lrformer_edge.backends.pytorch.runner import TorchRunner
    from lrformer_edge.evaluation import confusion_of
    from lrformer_edge.pipeline import SegmentationPipeline
    from lrformer_edge.training import DistInfo, summed_over_processes

    info = info or DistInfo()
    shard = [s for i, s in enumerate(samples) if i % info.world_size == info.rank]
    model.eval()
    runner = TorchRunner(model, input_size=input_size, device="cpu" if not
                         torch.cuda.is_available() else None)
    with SegmentationPipeline(runner, data_config, input_size) as pipeline:
        matrix, _ = confusion_of(pipeline, shard)
    return summed_over_processes(matrix, info).compute()


def train_qat(config: QATConfig, log=print) -> dict:
    """Run QAT as ``config`` says; returns the summary (also written to WORK_DIR/summary.json)."""
    from lrformer_edge.data.calibration import build_calibration_set
    from lrformer_edge.data.datasets import open_dataset
    from lrformer_edge.models.deploy import check_input_size, to_deploy
    from lrformer_edge.models.factory import create_model
    from lrformer_edge.training import (
        AugmentedSegmentation,
        finish_run,
        init_distributed,
        training_device,
    )

    info = init_distributed()
    device = training_device(info)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed + info.rank)
    size = check_input_size(config.input_size)
    work_dir = Path(config.work_dir)
    if info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)

    def say(message):
        if info.is_main:
            log(message)

    teacher_model = create_model(config.variant, checkpoint=config.checkpoint)
    data_config = teacher_model.config.data
    train_set = open_dataset(config.data, "train")
    val_set = open_dataset(config.data, "val")
    val_samples = [val_set[i] for i in range(min(config.val_images, len(val_set)))]
    teacher = to_deploy(teacher_model, size).eval().to(device)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)

    calibration = build_calibration_set(config.calib_source or config.data, data_config, size,
                                        config.calib_images, config.seed)
    latest = work_dir / "latest.pth"
    start, best = 0, {"mIoU": -1.0, "iter": 0}
    if config.resume and latest.is_file():
        student, payload = restore(latest)
        start, best = payload["iteration"], payload["best"]
        say(f"resumed from {latest} at iteration {start}")
    else:
        say(f"NNCF post-training quantization ({config.target} rules) on "
            f"{len(calibration.batches)} calibration images as the QAT starting point")
        student = quantize_for_training(teacher_model, size, calibration, config.target,
                                        config.cpu_isa)
        payload = None
    student.to(device)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad],
                                  lr=config.lr, weight_decay=config.weight_decay)
    if payload is not None and payload.get("optimizer"):
        optimizer.load_state_dict(payload["optimizer"])
    wrapped = student
    if info.world_size > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            student, device_ids=[info.local_rank] if device.type == "cuda" else None)

    # The PTQ figure (before any fine-tuning) is kept for the PTQ-vs-QAT comparison.
    ptq = evaluate_fixed_size(student, val_samples, data_config, size, info) if start == 0 \
        else payload.get("config", {}).get("extra", {}).get("ptq")
    fp32 = evaluate_fixed_size(teacher, val_samples, data_config, size, info)
    if start == 0:
        config.extra["ptq"] = ptq
        say(f"validation mIoU before QAT: FP32 {100 * fp32['mIoU']:.2f}, "
            f"PTQ INT8 {100 * ptq['mIoU']:.2f}")

    augmented = AugmentedSegmentation(train_set, data_config.mean, data_config.std,
                                      data_config.test_scale, size, (0.75, 1.5), config.seed)
    sampler = torch.utils.data.DistributedSampler(
        augmented, info.world_size, info.rank, shuffle=True, seed=config.seed) \
        if info.world_size > 1 else None
    epoch = start * config.batch_size * info.world_size // max(1, len(augmented))

    def batches():
        nonlocal epoch
        while True:
            augmented.epoch = epoch
            if sampler is not None:
                sampler.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                augmented, batch_size=config.batch_size, sampler=sampler,
                shuffle=sampler is None, drop_last=True, num_workers=0,
                generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
            yield from loader
            epoch += 1

    say(f"QAT of {config.variant} at {size[0]}x{size[1]}: iterations {start}..{config.iters}, "
        f"batch {config.batch_size} x {info.world_size} process(es), lr {config.lr}, "
        f"task weight {config.task_weight}, distillation weight {config.distill_weight} "
        f"(T={config.temperature}), BatchNorm statistics "
        f"{'updated' if config.update_bn_stats else 'frozen'}")
    stream, history = batches(), []
    started = window = time.time()
    source_sha = getattr(teacher_model, "checkpoint_sha256", None)
    for iteration in range(start, config.iters):
        student.train()
        if not config.update_bn_stats:
            _freeze_normalization_and_dropout(student)
        images, labels = next(stream)
        images, labels = images.to(device), labels.to(device)
        with torch.no_grad():
            soft = teacher(images)
        logits = wrapped(images)
        task = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        distill = distillation_loss(logits, soft, config.temperature)
        loss = config.task_weight * task + config.distill_weight * distill
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = iteration + 1
        if done % config.log_interval == 0 or done == config.iters:
            per_iter = (time.time() - window) / config.log_interval
            say(f"iter {done}/{config.iters}  loss {loss.item():.4f} (task {task.item():.4f}, "
                f"distill {distill.item():.4f})  {per_iter:.2f} s/iter  "
                f"eta {per_iter * (config.iters - done) / 60:.1f} min")
            window = time.time()
        if done % config.val_interval == 0 or done == config.iters:
            metrics = evaluate_fixed_size(student, val_samples, data_config, size, info)
            history.append({"iter": done, "mIoU": metrics["mIoU"]})
            say(f"iter {done}: val mIoU {100 * metrics['mIoU']:.2f} (FP32 "
                f"{100 * fp32['mIoU']:.2f}, PTQ {100 * ptq['mIoU']:.2f})")
            if metrics["mIoU"] > best["mIoU"]:
                best = {"mIoU": metrics["mIoU"], "iter": done}
                if info.is_main:
                    _save(work_dir / "best.pth", student, None, done, best, config,
                          config.variant, source_sha, calibration.describe())
            if info.is_main:
                _save(latest, student, optimizer, done, best, config, config.variant,
                      source_sha, calibration.describe())
    summary = {"variant": config.variant, "target": config.target, "iters": config.iters,
               "input_size": list(size), "fp32_mIoU": fp32["mIoU"], "ptq_mIoU": ptq["mIoU"],
               "best": best, "history": history, "minutes": (time.time() - started) / 60,
               "world_size": info.world_size, "calibration_set": calibration.describe()}
    return finish_run(info, work_dir, summary)



# ----------------------------------------------------------------------------- exports
def _stripped(quantized, feed):
    """The fake-quant model with NNCF's hooks replaced by torch fake-quantize ops (what the
    OpenVINO converter and the ONNX exporter understand)."""
    import logging

    nncf = _nncf()
    require("torchao", "qat", "stripping a QAT model for export")
    logging.getLogger("torchao").setLevel(logging.ERROR)  # GPU-kernel chatter on CPU hosts
    return nncf.strip(quantized, do_copy=True, example_input=torch.from_numpy(feed))


def _with_qdq_export(quantized):
    """A copy whose NNCF quantizers export as ONNX QuantizeLinear/DequantizeLinear pairs
    (their default is OpenVINO's custom FakeQuantize op, which TensorRT does not parse)."""
    import copy

    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import BaseQuantizer, QuantizerExportMode

    model = copy.deepcopy(quantized).eval()
    for _, module in get_hook_storage(model).named_hooks():
        if isinstance(module, BaseQuantizer):
            module.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
    return model


def _check_against_fake_quant(quantized, runner, feed, name: str):
    """The exported artifact must reproduce the torch fake-quant model it came from."""
    from lrformer_edge.artifacts.parity import ParityThresholds, check_parity

    # Same int8 model, another runtime: only rounding at quantizer boundaries differs (measured:
    # logits cosine 0.9986-0.9996, argmax agreement 99.7-99.8% for a Q/DQ ONNX in ONNX Runtime).
    # A broken export (wrong scale, missing quantizer) lands far below these bounds.
    thresholds = ParityThresholds(max_abs=float("inf"), min_cosine=0.995,
                                  min_pixel_agreement=0.99)
    return check_parity(quantized.eval(), runner, feed, thresholds, f"{name} vs the QAT model")


def export_qat_openvino(quantized, payload: dict, output_dir, feed):
    """OpenVINO INT8 IR of a QAT model, checked against the fake-quant model, then renamed in."""
    import warnings

    from lrformer_edge.artifacts.metadata import artifact_metadata, decode_metadata
    from lrformer_edge.artifacts.parity import INPUT_NAME, OUTPUT_NAME
    from lrformer_edge.artifacts.result import ExportResult
    from lrformer_edge.artifacts.staging import staged_directory
    from lrformer_edge.backends.openvino.export import compiles_under_every_hint
    from lrformer_edge.backends.openvino.ir import write_rt_metadata
    from lrformer_edge.backends.openvino.runner import OpenVINORunner

    ov = require("openvino", "openvino", "OpenVINO export")
    start = time.time()
    output_dir = Path(output_dir)
    with staged_directory(output_dir) as staging:
        example = torch.from_numpy(feed)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about the fake-quant ops
            ov_model = ov.convert_model(_stripped(quantized, feed), example_input=example,
                                        input=[tuple(example.shape)])  # fixed, like the ONNX IRs
        ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})  # as in the ONNX-based IRs
        ov_model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
        metadata = artifact_metadata(quantized, payload["input_size"], format="openvino-ir",
                                     weights_precision="int8", quantization=_qat_settings(payload),
                                     calibration_set=payload.get("calibration_set"),
                                     openvino_version=ov.__version__)
        write_rt_metadata(ov_model, metadata)
        xml = staging / f"{payload['variant']}-qat.xml"
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)
        # The fake-quant model computes exactly; a host whose int8 sums saturate is emulated
        # when the IR is made for VNNI CPUs (a portable IR matches natively everywhere).
        emulate = int8_mismatch(_qat_settings(payload).get("target_cpu_isa")) is not None
        agreement = _check_against_fake_quant(
            quantized, OpenVINORunner(xml, precision="f32", emulate_exact_int8=emulate), feed,
            xml.name)
        compiles_under_every_hint(xml)
    return ExportResult(output_dir / xml.name, agreement, time.time() - start, {},
                        decode_metadata(metadata))


def export_qat_qdq_onnx(quantized, payload: dict, output, feed):
    """TensorRT Q/DQ ONNX of a QAT model (the same checks as the PTQ one), then renamed in."""
    import tempfile
    import warnings

    import onnx

    from lrformer_edge.artifacts.metadata import artifact_metadata, decode_metadata
    from lrformer_edge.artifacts.parity import INPUT_NAME, OUTPUT_NAME
    from lrformer_edge.artifacts.result import ExportResult
    from lrformer_edge.backends.onnxruntime.export import MIN_OPSET
    from lrformer_edge.backends.onnxruntime.format import op_histogram
    from lrformer_edge.backends.onnxruntime.runner import OnnxRuntimeRunner
    from lrformer_edge.backends.tensorrt.export import (
        fold_constants,
        require_tensorrt_form,
    )
    from lrformer_edge.backends.tensorrt.qdq import qdq_summary, to_signed_int8
    from lrformer_edge.files import atomic_write

    start = time.time()
    output = Path(output)
    with tempfile.TemporaryDirectory(prefix="lrformer-qat-onnx-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(_with_qdq_export(quantized), (torch.from_numpy(feed),), str(raw),
                              dynamo=False, opset_version=MIN_OPSET, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], do_constant_folding=True)
        graph = to_signed_int8(fold_constants(raw, Path(tmp) / "folded.onnx"))
        settings = _qat_settings(payload)
        settings.update(qdq_summary(graph))
        metadata = artifact_metadata(quantized, payload["input_size"], format="onnx",
                                     target="tensorrt", precision="int8", opset=MIN_OPSET,
                                     batch_size=1, quantization=settings,
                                     calibration_set=payload.get("calibration_set"))
        for key, value in metadata.items():
            graph.metadata_props.add(key=key, value=value)
        require_tensorrt_form(graph, "the QAT Q/DQ ONNX")
        staged = Path(tmp) / "staged.onnx"
        onnx.save(graph, str(staged))
        agreement = _check_against_fake_quant(
            quantized, OnnxRuntimeRunner(staged, providers=["CPUExecutionProvider"]), feed,
            output.name)
        atomic_write(output, lambda path: Path(path).write_bytes(staged.read_bytes()))
    return ExportResult(output, agreement, time.time() - start, op_histogram(graph),
                        decode_metadata(metadata))


def _qat_settings(payload: dict) -> dict:
    from lrformer_edge.backends.openvino.ptq import target_isa_settings

    config = payload.get("config", {})
    # Checkpoints from before cpu_isa existed used NNCF's default: their target is unrecorded.
    isa = (target_isa_settings(weight_target_isa(payload.get("target"), config["cpu_isa"]))
           if "cpu_isa" in config else {})
    return {"tool": f"nncf {_nncf().__version__} QAT (torch)", "target": payload.get("target"),
            **isa,
            "iterations": payload.get("iteration"), "best_val_mIoU": payload.get("best"),
            "lr": config.get("lr"), "distill_weight": config.get("distill_weight"),
            "task_weight": config.get("task_weight"),
            "temperature": config.get("temperature"), "format": "Q/DQ, int8, zero-point 0"}
