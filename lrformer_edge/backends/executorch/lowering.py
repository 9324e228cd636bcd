"""Deploy form -> ExecuTorch program with the XNNPACK delegate: torch.export, optional PT2E INT8
(XNNPACK quantizer), graph shaping so the hot path is delegated (``shaping.py``), lowering,
serialisation. Each stage is timed: the time goes into graph passes, not data.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from lrformer_edge.backends.executorch.shaping import (
    fold_batch_norms,
    fold_constants,
    shape_for_xnnpack,
    share_identical_constants,
)
from lrformer_edge.progress import heartbeat, track

# XNNPACK's int8 kernels: symmetric per-channel weights, per-tensor activations.
QUANTIZATION = {"scheme": "PT2E static", "quantizer": "XNNPACKQuantizer",
                "weights": "int8 symmetric per-channel", "activations": "int8 per-tensor, min/max",
                "quantized_ops": "dense convolutions and linears"}
ACTIVATION_EPS = 2 ** -12  # the smallest activation scale, as XNNPACK's own config
_LAYER_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)


@dataclass
class LoweredProgram:
    """A serialised ``.pte`` and how it was made."""

    buffer: bytes
    stage_seconds: dict[str, float] = field(default_factory=dict)  # export, quantize, lower, ...
    delegated_ops: Counter = field(default_factory=Counter)  # op -> count inside XNNPACK
    portable_ops: Counter = field(default_factory=Counter)  # op -> count left to portable kernels
    quantization: dict = field(default_factory=dict)  # the PT2E settings (int8 only)
    rewrites: dict = field(default_factory=dict)  # shaping rewrites made, by kind


class _StageTimer:
    """Times each stage, and shows it as under way while it runs (a stage is one long call)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        with heartbeat(f"ExecuTorch {stage}"):
            yield
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - start, 2)


def lower_to_executorch(deployed: torch.nn.Module, input_size: tuple[int, int],
                        constant_methods: Mapping[str, torch.Tensor],
                        calibration: Iterable[torch.Tensor] | None = None,
                        float_layers: Collection[str] = (),
                        log: Callable[[str], None] = print) -> LoweredProgram:
    """``deployed``: a ``to_deploy`` model at ``input_size``; ``calibration``: normalised
    (1, 3, H, W) batches for INT8 (None: FP32); ``float_layers``: module names of layers INT8
    leaves in float (a precision config's); ``constant_methods``: extra program methods
    returning constants (the metadata)."""
    timer = _StageTimer()
    example = (torch.zeros(1, 3, *input_size),)
    quantization: dict = {}
    with _without_provenance():
        with timer("export"):
            module = torch.export.export(deployed, example, strict=False).module()
            rewrites = {"constants_folded": fold_constants(module),
                        "batch_norms_folded": fold_batch_norms(module)}
        if calibration is not None:
            with timer("quantize"):
                module, quantization = quantize_pt2e(module, calibration, float_layers)
        with timer("shape"):
            rewrites.update(shape_for_xnnpack(module, example))
            rewrites["constants_shared"] = share_identical_constants(module)
            program = torch.export.export(module, example, strict=False)
        log(f"shaped for XNNPACK: {rewrites}")
        with timer("lower"):
            edge = _lower(program, constant_methods)
    delegated, portable = count_ops(edge.exported_program())
    with timer("serialize"):
        buffer = bytes(edge.to_executorch().buffer)
    return LoweredProgram(buffer, timer.seconds, delegated, portable, quantization, rewrites)


def _lower(program, constant_methods: Mapping[str, torch.Tensor]):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    # The edge-dialect verifier re-checks every operator's dtypes after each of ~60 passes
    # (a sixth of the lowering time); the written program is checked by running it instead
    # (the export's parity check against PyTorch).
    config = EdgeCompileConfig(_check_ir_validity=False)
    with _only_applicable_xnnpack_passes():
        return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                           constant_methods=dict(constant_methods),
                                           compile_config=config)


def quantize_pt2e(module: torch.fx.GraphModule, calibration: Iterable[torch.Tensor],
                  float_layers: Collection[str] = ()):
    """PT2E static INT8 with the XNNPACK quantizer, calibrated on ``calibration``; the layers
    named in ``float_layers`` (module names) stay float."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(_quantization_config())
    quantized_node = quantized_node_filter(module.graph, float_layers)
    prepared = prepare_pt2e(module, quantizer.set_filter_function(quantized_node))
    images = 0
    with torch.no_grad():
        for batch in track(calibration, what="images", label="PT2E calibration"):
            prepared(batch)
            images += 1
    if not images:
        raise ValueError("the calibration set is empty: INT8 needs at least one image")
    converted = convert_pt2e(prepared)
    return converted, {**QUANTIZATION, "calibration_images": images,
                       "int8_layers": len(int8_layers(converted.graph))}


def layer_of(node: torch.fx.Node) -> str | None:
    """The module name of the layer that computes ``node`` (its innermost module in the
    exported graph's ``nn_module_stack``; a module called again, as the ``d_convsN.i`` every
    block of a stage shares, keeps its name), or None for a node no module made."""
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else None


def layer_nodes(graph: torch.fx.Graph) -> dict[str, list[torch.fx.Node]]:
    """The convolution and linear nodes of ``graph``, by the module name of their layer."""
    nodes: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _LAYER_OPS and layer_of(node):
            nodes.setdefault(layer_of(node), []).append(node)
    return nodes


def int8_layers(graph: torch.fx.Graph) -> list[str]:
    """The layers of a converted PT2E graph whose weights are int8 (dequantized into their
    convolution or linear), by module name."""
    return [name for name, nodes in layer_nodes(graph).items()
            if any(_is_dequantize(node.args[1]) for node in nodes)]


def _is_dequantize(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" \
        and "dequantize" in _op_name(node.target)


def quantized_node_filter(graph: torch.fx.Graph, float_layers: Collection[str] = ()) \
        -> Callable[[torch.fx.Node], bool]:
    """The XNNPACK quantizer's filter (``_quantized_node``) with the layers named in
    ``float_layers`` refused. A name that no convolution or linear of ``graph`` carries is an
    error: the config would silently apply to nothing."""
    kept_float = frozenset(float_layers)
    missing = sorted(kept_float - set(layer_nodes(graph)))
    if missing:
        raise ValueError(f"the precision config keeps {len(missing)} layer(s) in float that no "
                         f"convolution or linear of the exported graph comes from: "
                         f"{', '.join(missing)}; expected module names of the deploy form's "
                         f"layers (models/layers.py)")

    def quantized(node: torch.fx.Node) -> bool:
        # A pattern's weight and bias (get_attr) pass: the operator's answer decides it.
        return _quantized_node(node) and (node.op == "get_attr"
                                          or layer_of(node) not in kept_float)
    return quantized


def _quantized_node(node: torch.fx.Node) -> bool:
    """Which nodes the XNNPACK quantizer may annotate: dense convolutions and linears, where
    the compute is. Everything else stays float inside the delegate.

    With XNNPACK's whole pattern set, the LayerNorm arithmetic was quantized too (the square of
    the centred map, the residual adds): LRFormer-T on procedural scenes fell to cosine 0.85 and
    83% agreement with PyTorch. A quantized depthwise convolution of LRFormer-T was refused by
    XNNPACK when the program was loaded ("Failed to create depthwise convolution node ...
    xnn_status_invalid_parameter"); they are memory-bound, int8 would save little there.

    The quantizer asks about every node of a pattern, the weight and bias too: those must pass,
    or no convolution is ever annotated."""
    if node.op == "get_attr":
        return True
    if node.target in (torch.ops.aten.linear.default, torch.ops.aten.relu.default):
        return True  # a ReLU joins its convolution's pattern
    if node.target is not torch.ops.aten.conv2d.default:
        return False
    groups = node.args[6] if len(node.args) > 6 else 1
    return groups == 1


def _quantization_config():
    """XNNPACK's symmetric per-channel config with min/max activation observers.

    Its default histogram observers search every activation's range at convert time: 355 s
    for LRFormer-T on 2 cores, and one range so narrow that XNNPACK refused the depthwise
    convolution it fed (requantization scale out of range) when the program was loaded."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e import MinMaxObserver

    config = get_symmetric_quantization_config(is_per_channel=True)
    activation = dataclasses.replace(
        config.input_activation,
        observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=ACTIVATION_EPS))
    return dataclasses.replace(config, input_activation=activation, output_activation=activation)


@contextmanager
def _without_provenance() -> Iterator[None]:
    """Trace and lower without fx's node provenance (``meta["from_node"]``).

    Every pass that re-traces a graph deep-copies each node's whole provenance chain into the
    new node, so the cost grows with the square of the number of passes: on LRFormer it was
    about a third of the lowering time. Provenance serves debugging tools only; nodes keep
    their names and stack traces.
    """
    from torch.fx import traceback as fx_traceback

    original = fx_traceback.NodeSource.__init__

    def without_history(self, node, pass_name="", action=None):
        history = node.meta.pop("from_node", None) if node is not None else None
        try:
            original(self, node, pass_name, action)
        finally:
            if history is not None:
                node.meta["from_node"] = history

    fx_traceback.NodeSource.__init__ = without_history
    try:
        yield
    finally:
        fx_traceback.NodeSource.__init__ = original


def _has_batch_norm(graph: torch.fx.Graph) -> bool:
    return any("batch_norm" in _op_name(node.target) for node in graph.nodes
               if node.op == "call_function")


def _has_conv1d(graph: torch.fx.Graph) -> bool:
    def weight_rank(node: torch.fx.Node) -> int:
        return len(getattr(node.args[1], "meta", {}).get("val", torch.empty(0, 0, 0, 0)).shape)
    return any(_op_name(node.target) == "aten.convolution" and weight_rank(node) == 3
               for node in graph.nodes if node.op == "call_function")


def _has_all_ops(*names: str) -> Callable[[torch.fx.Graph], bool]:
    def present(graph: torch.fx.Graph) -> bool:
        found = {_op_name(node.target) for node in graph.nodes if node.op == "call_function"}
        return all(name in found for name in names)
    return present


def _has_upsample_without_static_size(graph: torch.fx.Graph) -> bool:
    """The bilinear pass re-creates each ``upsample_bilinear2d(x, [h, w], align_corners, None)``
    as exactly that (its pattern is the op itself; it exports the pattern graphs first, ~5 s):
    only an upsample given by scale factors changes."""
    def static(node: torch.fx.Node) -> bool:
        size, scales = (list(node.args) + [None, None, None])[1:4:2]
        return isinstance(size, (list, tuple)) and all(isinstance(side, int) for side in size) \
            and scales is None
    return any(_op_name(node.target) == "aten.upsample_bilinear2d" and not static(node)
               for node in graph.nodes if node.op == "call_function")


# XNNPACK delegate passes that rewrite only ops a graph may lack, each with the test for them.
# Every pass re-traces the whole graph with fake tensors (2-5 s each for LRFormer-T, a quarter
# of the delegate's lowering), and these find nothing to do in the deploy form.
_PASS_APPLIES: dict[str, Callable[[torch.fx.Graph], bool]] = {
    "FuseBatchNormPass": _has_batch_norm,
    "DecomposeBatchNorm": _has_batch_norm,
    "Conv1dUnsqueezePass": _has_conv1d,
    "PReLUReshapePass": _has_all_ops("aten._prelu_kernel"),
    # Its patterns are SDPA decomposed with a mask (and it exports them first, about 5 s).
    "ConvertToSDPAPass": _has_all_ops("aten.any", "aten.logical_not", "aten.where"),
    "ConvertToUpsampleBilinear2d": _has_upsample_without_static_size,
    "RemoveGetItemPass": _has_all_ops("getitem"),
}


@contextmanager
def _only_applicable_xnnpack_passes() -> Iterator[None]:
    """Run the XNNPACK delegate's passes except those ``_PASS_APPLIES`` shows have nothing to
    rewrite in the program at hand. A test checks that the program is the same either way."""
    from executorch.backends.xnnpack._passes import XNNPACKPassManager

    original = XNNPACKPassManager.transform

    def transform(manager):
        graph = manager.exported_program.graph
        manager.passes = [pass_ for pass_ in manager.passes
                          if _PASS_APPLIES.get(pass_.__name__, lambda _: True)(graph)]
        return original(manager)

    XNNPACKPassManager.transform = transform
    try:
        yield
    finally:
        XNNPACKPassManager.transform = original


def count_ops(program) -> tuple[Counter, Counter]:
    """Operators inside XNNPACK delegates and those left to portable kernels, by name."""
    delegated, portable = Counter(), Counter()
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name == "executorch_call_delegate":
            lowered = getattr(program.graph_module, node.args[0].target)
            delegated.update(_op_name(inner.target)
                             for inner in lowered.original_module.graph.nodes
                             if inner.op == "call_function")
        elif name != "getitem":
            portable[name] += 1
    return delegated, portable


def _op_name(target) -> str:
    """``aten.convolution`` for ``aten.convolution.default`` (as ETDump names the op)."""
    name = getattr(target, "__name__", None) or str(target)
    name = name.split(": schema")[0].removeprefix("<EdgeOpOverload: ").rstrip(">")
    return name.rsplit(".", 1)[0] if name.count(".") >= 2 else name
