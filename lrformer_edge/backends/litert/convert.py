"""From the deploy form to a ``.tflite``: ``litert-torch`` converts it to an FP32 model, then
``ai-edge-quantizer`` (the quantizer Google recommends over PT2E inside the converter) makes the
FP16 or INT8 model from that one by a recipe.

* FP16: every weight stored as float16, compute in float (LiteRT's GPU delegate runs it in
  half precision; XNNPACK on CPUs expands the weights to float32 when it loads the model).
* INT8: static int8 weights (symmetric, per output channel) and activations (asymmetric, per
  tensor, min/max over the calibration set) for the convolutions (dense and depthwise) and the
  linears, with float input and output. LayerNorm (as reductions), softmax, GELU, the
  attention's batched matrix products and the resizes stay float. Measured on LRFormer-T at
  512x512 (32 calibration scenes, 8 others, 2 threads, AVX2): convolutions and linears 99.72%
  agreement with FP32 at 297.6 ms against 331.4 ms for FP32; without the depthwise
  convolutions 99.76% but 339.5 ms (slower than FP32: a quantize/dequantize pair around each
  int8 layer); with the batched matmuls too 97.79% and 713.1 ms; every operator (the
  quantizer's default recipe) 97.8% and 3x slower than FP32 (XNNPACK has no int8 kernels for
  several of them, and LiteRT runs those on its reference kernels).
* INT8 with a precision config: the operators of its float layers (``layer_ops.py`` finds them
  by weight) get recipe entries that keep them float, after the INT8 ones.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from lrformer_edge.backends.litert.format import litert_module
from lrformer_edge.backends.litert.layer_ops import (
    check_recipe_keeps_float,
    float_ops_of,
    keep_float_recipe,
)
from lrformer_edge.progress import heartbeat, track

INT8_OPERATIONS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D")
_INT8_CONFIG = {
    "activation_tensor_config": {"num_bits": 8, "symmetric": False,
                                 "granularity": "TENSORWISE", "dtype": "INT"},
    "weight_tensor_config": {"num_bits": 8, "symmetric": True,
                             "granularity": "CHANNELWISE", "dtype": "INT"},
    "compute_precision": "INTEGER", "explicit_dequantize": False, "skip_checks": False,
    "min_weight_elements": 0,
}
_FP16_CONFIG = {
    "weight_tensor_config": {"num_bits": 16, "symmetric": True,
                             "granularity": "TENSORWISE", "dtype": "FLOAT"},
    "compute_precision": "FLOAT", "explicit_dequantize": True, "skip_checks": False,
    "min_weight_elements": 0,
}


def quantization_recipe(precision: str, float_ops: Iterable = ()) -> list[dict]:
    """The ai-edge-quantizer recipe of ``precision`` (fp16, int8), recorded in the metadata;
    ``float_ops`` (int8): ``layer_ops.TfliteOp``s it keeps float."""
    if precision == "int8":
        return [{"regex": ".*", "operation": operation,
                 "algorithm_key": "min_max_uniform_quantize", "op_config": _INT8_CONFIG}
                for operation in INT8_OPERATIONS] + keep_float_recipe(float_ops)
    if precision == "fp16":
        return [{"regex": ".*", "operation": "*", "algorithm_key": "float_casting",
                 "op_config": _FP16_CONFIG}]
    raise ValueError(f"no quantization recipe for {precision!r}: fp16 and int8 have one")


@dataclass
class Conversion:
    """A converted model and what the conversion measured."""

    model: bytes
    stage_seconds: dict[str, float] = field(default_factory=dict)
    recipe: list[dict] | None = None


def convert_float(deployed, input_size: tuple[int, int]) -> bytes:
    """The FP32 ``.tflite`` of the deploy form (one NCHW float input, logits out)."""
    import torch

    converter = litert_module("litert_torch", "LiteRT export")
    converter.config.show_progress = False  # our heartbeat reports the step instead
    sample = (torch.zeros(1, 3, *input_size),)
    with heartbeat("LiteRT conversion (litert-torch)"), torch.no_grad():
        return bytes(converter.convert(deployed, sample).model_content())


def quantize(model: bytes, precision: str, calibration: Iterable[np.ndarray] | None,
             threads: int | None, recipe: list[dict] | None = None) -> bytes:
    """``model`` (FP32) made ``precision`` by ``recipe`` (default: its recipe), INT8
    calibrated on ``calibration``."""
    module = litert_module("ai_edge_quantizer.quantizer", "LiteRT quantization")
    recipe = recipe or quantization_recipe(precision)
    quantizer = module.Quantizer(bytearray(model), recipe)
    with _without_quantizer_bars():
        ranges = calibrate(model, recipe, list(calibration), threads) \
            if precision == "int8" else None
        with heartbeat(f"LiteRT {precision.upper()} quantization"):
            return bytes(quantizer.quantize(ranges, enable_progress_bar=False,
                                            enable_progress_report=False).quantized_model)


def calibrate(model: bytes, recipe: list[dict], batches: list[np.ndarray],
              threads: int | None) -> dict:
    """The activation ranges (ai-edge-quantizer's per-tensor min/max) of ``model`` over
    ``batches``, one image at a time so that progress can be shown."""
    calibrator = litert_module("ai_edge_quantizer.calibrator", "LiteRT quantization")
    recipes = litert_module("ai_edge_quantizer.recipe_manager", "LiteRT quantization")
    manager = recipes.RecipeManager()
    manager.load_quantization_recipe(recipe)
    # Min/max recorded in C++ during inference instead of copying every intermediate tensor
    # out to Python: min/max is all the recipe needs.
    # Without a thread count, every CPU of this machine (the quantizer's own default is 16).
    runner = calibrator.Calibrator(model, num_threads=threads or os.cpu_count() or 1,
                                   mode=calibrator.CalibrationMode.CALIBRATION_PROFILER_BASED)
    signature, input_name = _signature_input(model)
    for batch in track(batches, what="images", label="LiteRT calibration"):
        runner.calibrate({signature: [{input_name: batch}]}, manager)
    return runner.get_model_qsvs()


@contextmanager
def _without_quantizer_bars() -> Iterator[None]:
    """ai-edge-quantizer draws tqdm bars (carriage returns that garble logs, one of them not
    switchable); our own progress reports those steps instead."""
    bars = litert_module("ai_edge_quantizer.utils.progress_utils", "LiteRT quantization")
    tqdm = bars.tqdm
    bars.tqdm = SimpleNamespace(tqdm=lambda *args, **kwargs: tqdm.tqdm(
        *args, **{**kwargs, "disable": True}))
    try:
        yield
    finally:
        bars.tqdm = tqdm


def _signature_input(model: bytes) -> tuple[str, str]:
    """The default signature's name and its one input's name (the quantizer's feed keys)."""
    interpreter = litert_module("ai_edge_litert.interpreter", "LiteRT quantization").Interpreter(
        model_content=model)
    signatures = interpreter.get_signature_list()
    name = next(iter(signatures))
    return name, signatures[name]["inputs"][0]


def convert(deployed, input_size: tuple[int, int], precision: str,
            calibration: Iterable[np.ndarray] | None = None,
            threads: int | None = None, float_layers: Collection[str] = ()) -> Conversion:
    """The ``.tflite`` of ``precision`` (fp32, fp16, int8), with the stage timings;
    ``float_layers`` (int8): module names of layers kept float (a precision config's)."""
    stages = {}
    start = time.perf_counter()
    model = convert_float(deployed, input_size)
    stages["convert"] = time.perf_counter() - start
    if precision == "fp32":
        return Conversion(model, stages)
    start = time.perf_counter()
    float_ops = [op for ops in float_ops_of(model, deployed, float_layers).values()
                 for op in ops]
    recipe = quantization_recipe(precision, float_ops)
    if float_ops:
        check_recipe_keeps_float(model, recipe, float_ops)
    model = quantize(model, precision, calibration, threads, recipe)
    stages["quantize"] = time.perf_counter() - start
    return Conversion(model, stages, recipe)


def operator_counts(model: bytes) -> tuple[Counter, Counter]:
    """The model's operators by name: those that compute in int8, and those that stay float
    (QUANTIZE/DEQUANTIZE, the conversions between them, count with neither)."""
    schema = litert_module("ai_edge_litert.schema_py_generated", "reading a .tflite")
    root = schema.Model.GetRootAs(model, 0)
    names = {value: name for name, value in vars(schema.BuiltinOperator).items()
             if not name.startswith("_")}
    graph = root.Subgraphs(0)
    int8, float_ops = Counter(), Counter()
    for index in range(graph.OperatorsLength()):
        operator = graph.Operators(index)
        code = root.OperatorCodes(operator.OpcodeIndex())
        name = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
        if name in ("QUANTIZE", "DEQUANTIZE"):
            continue
        output = graph.Tensors(operator.Outputs(0))
        integer = output.Type() in (schema.TensorType.INT8, schema.TensorType.INT16)
        (int8 if integer else float_ops)[name] += 1
    return int8, float_ops
