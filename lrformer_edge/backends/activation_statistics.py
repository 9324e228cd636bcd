"""One calibration statistics pass for every NNCF target: the activations of the FP32 ONNX.

NNCF's OpenVINO and ONNX backends see different graphs of the same model (OpenVINO splits a
biased convolution into ``X/WithoutBiases`` and an ``Add``; ONNX Runtime's constant folding fuses
``MatMul``+``Add`` into ``Gemm``), so their statistic points differ, and each of NNCF's own
passes copies every observed tensor of every image out of the runtime (0.7 GB per image for
LRFormer-T at 512x512). Both graphs come from the same FP32 ONNX, whose tensor names they keep.

This pass runs that ONNX once per calibration image in ONNX Runtime with the reductions inside
the graph, placed right after each tensor's producer, so only reduced values leave the runtime
and every tensor is freed as in plain inference. Per float tensor it keeps what NNCF's range and
bias-correction statistics are made of:

* the per-image minimum and maximum over the whole tensor (per-tensor ranges, under any of
  NNCF's aggregators: mean, min, max over images);
* the mean over images of the per-image mean per channel, along axis 1 and along the last axis
  (fast bias correction's channel means; ``mean_per_channel`` of a 2-D tensor is the last one),
  for the inputs and outputs of biased layers;
* the per-image minimum and maximum per channel, along axis 1 and along the last axis, for the
  inputs of depthwise convolutions (quantized per channel on CPUs) and the outputs of layer
  scales after a bias (``_scaled_biased_outputs``);
* its shape.

``nncf_collectors`` fills each backend's collectors from these through resolvers that name the
ONNX tensor a statistic point observes; what this cannot answer (weights, tensors the ONNX does
not name) is left to NNCF's own pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrformer_edge.progress import heartbeat, track

_SEPARATOR = "::"
FIELDS = ("min", "max", "mean_axis1", "mean_last", "shape", "min_axis1", "max_axis1", "min_last",
          "max_last")


@dataclass
class TensorStatistics:
    """What the pass keeps of one tensor (see the module docstring)."""

    min: np.ndarray  # (images,)
    max: np.ndarray  # (images,)
    mean_axis1: np.ndarray | None  # (channels,), rank >= 3 only
    mean_last: np.ndarray | None  # (last dim,), rank >= 2
    shape: tuple[int, ...]
    # (images, channels) along axis 1 and along the last axis: inputs of depthwise convolutions,
    # and outputs of (x + b) * s (``_channel_range_tensors``)
    min_axis1: np.ndarray | None = None
    max_axis1: np.ndarray | None = None
    min_last: np.ndarray | None = None
    max_last: np.ndarray | None = None

    def viewed_as(self, shape: tuple[int, ...]) -> TensorStatistics:
        """The statistics of a reshaped view of this tensor (the same values): its ranges, and
        its last-axis means where the last axis is unchanged."""
        shape = tuple(int(d) for d in shape)
        if shape == self.shape:
            return self
        return TensorStatistics(
            min=self.min, max=self.max, mean_axis1=None,
            mean_last=self.mean_last if shape[-1:] == self.shape[-1:] else None, shape=shape)

    def channel_means(self, axis: int) -> np.ndarray | None:
        """``nncf``'s ``mean_per_channel`` along ``axis``, averaged over images (None when the
        pass did not keep that axis)."""
        rank = len(self.shape)
        if rank < 2:
            return None
        if rank < 3:  # NNCF reduces axis 0 of a 2-D tensor whatever the channel axis
            return self.mean_last
        position = axis % rank
        if position == 1:
            return self.mean_axis1
        return self.mean_last if position == rank - 1 else None


class ActivationStatistics:
    """Statistics of the float tensors of one FP32 ONNX over one calibration set, by name."""

    def __init__(self, tensors: dict[str, TensorStatistics]):
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorStatistics:
        return self.tensors[name]

    def to_entry(self) -> dict[str, dict[str, np.ndarray]]:
        """{tensor: {field: array}}, as ``nncf_statistics.StatisticsCache`` keeps entries."""
        return {name: {field: np.asarray(getattr(statistics, field)) for field in FIELDS
                       if getattr(statistics, field) is not None}
                for name, statistics in self.tensors.items()}

    @classmethod
    def from_entry(cls, entry: dict[str, dict[str, np.ndarray]]) -> ActivationStatistics:
        return cls({name: TensorStatistics(
            min=values["min"], max=values["max"], mean_axis1=values.get("mean_axis1"),
            mean_last=values.get("mean_last"), shape=tuple(int(d) for d in values["shape"]),
            min_axis1=values.get("min_axis1"), max_axis1=values.get("max_axis1"),
            min_last=values.get("min_last"), max_last=values.get("max_last"))
            for name, values in entry.items()})


def measure_activation_statistics(onnx_path, batches, input_name: str | None = None
                                  ) -> ActivationStatistics:
    """Run the FP32 ONNX at ``onnx_path`` on ``batches`` (each (1, 3, H, W) float32) and keep
    the statistics of each of its float tensors."""
    import onnxruntime as ort

    with heartbeat("calibration statistics: preparing the measuring graph"):
        measuring, same_range = _measuring_graph(onnx_path)
        options = ort.SessionOptions()
        # Run nodes in the graph's order, so each reduction follows its tensor's producer and
        # the tensor is freed as in plain inference (the default order ran many reductions
        # last: 5 GB instead of 1.1 GB for LRFormer-T at 512x512).
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        session = ort.InferenceSession(measuring.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        del measuring
    input_name = input_name or session.get_inputs()[0].name
    output_names = [output.name for output in session.get_outputs()]
    accumulated: dict[str, dict[str, list]] = {}
    for batch in track(batches, what="images", label="calibration statistics (one pass, "
                                                     "shared by every target)"):
        for key, value in zip(output_names, session.run(output_names, {input_name: batch})):
            name, field = key.rsplit(_SEPARATOR, 1)
            accumulated.setdefault(name, {}).setdefault(field, []).append(value)
    for name, source in same_range.items():
        accumulated[name].update(min=accumulated[source]["min"], max=accumulated[source]["max"])
    return ActivationStatistics({name: _summarised(fields)
                                 for name, fields in accumulated.items()})


def _summarised(fields: dict[str, list]) -> TensorStatistics:
    shape = tuple(int(d) for d in fields["shape"][0])
    rank = len(shape)

    def per_image(field):
        values = fields.get(field)
        if values is None or rank < 2 or (field.endswith("axis1") and rank < 3):
            return None  # Flatten(2) of a 2-D tensor does not keep axis 1 apart
        return np.stack(values).astype(np.float32)

    def mean_over_images(field):
        values = fields.get(field)
        if values is None or rank < 2 or (field == "mean_axis1" and rank < 3):
            return None
        return np.mean(np.stack(values).astype(np.float64), axis=0).astype(np.float32)

    return TensorStatistics(
        min=np.asarray(fields["min"], dtype=np.float32).reshape(-1),
        max=np.asarray(fields["max"], dtype=np.float32).reshape(-1),
        mean_axis1=mean_over_images("mean_axis1"), mean_last=mean_over_images("mean_last"),
        shape=shape, min_axis1=per_image("min_axis1"), max_axis1=per_image("max_axis1"),
        min_last=per_image("min_last"), max_last=per_image("max_last"))


class Wiring:
    """Who produces and who reads each tensor of an ONNX graph."""

    def __init__(self, onnx_graph):
        self.initializers = {init.name for init in onnx_graph.initializer}
        self.ordered = list(onnx_graph.node)
        self.nodes = {node.name: node for node in onnx_graph.node}
        self.producers = {out: node for node in onnx_graph.node for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in onnx_graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def joined(self, names, op_types) -> set[str]:
        """``names`` and the tensors joined to them, either way, by nodes of ``op_types`` (from
        a node's first input to its output)."""
        group, pending = set(names), list(names)
        while pending:
            tensor = pending.pop()
            producer = self.producers.get(tensor)
            neighbours = [producer.input[0]] if producer is not None and \
                producer.op_type in op_types else []
            neighbours += [n.output[0] for n in self.consumers.get(tensor, [])
                           if n.op_type in op_types and n.input[0] == tensor]
            for neighbour in neighbours:
                if neighbour not in group:
                    group.add(neighbour)
                    pending.append(neighbour)
        return group


# Their outputs hold their first input's values, rearranged: same minimum and maximum.
_REARRANGING = ("Reshape", "Transpose", "Identity", "Flatten", "Squeeze", "Unsqueeze")


def _measuring_graph(onnx_path):
    """(the ONNX with, as its outputs, the reductions of every float tensor its nodes compute,
    {tensor: the tensor whose minimum and maximum it shares})."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    graph = model.graph
    floats = {info.name for info in list(graph.input) + list(graph.value_info)
              + list(graph.output) if info.type.tensor_type.elem_type == TensorProto.FLOAT}
    wiring = Wiring(graph)
    averaged, ranged = _channel_mean_tensors(wiring), _channel_range_tensors(wiring)
    same_range: dict[str, str] = {}
    nodes, outputs = [], []

    def measure(name, range_of=None):
        if name not in floats:
            return
        if range_of is not None:
            same_range[name] = same_range.get(range_of, range_of)
        reducing, reduced = _reductions(name, range_of is None, name in averaged,
                                        name in ranged)
        nodes.extend(reducing)
        outputs.extend(helper.make_tensor_value_info(out, kind, None) for out, kind in reduced)

    for graph_input in graph.input:
        measure(graph_input.name)
    for node in graph.node:
        nodes.append(node)
        if node.op_type == "Constant":
            continue
        rearranged = node.op_type in _REARRANGING and node.input[0] in floats
        for name in node.output:
            measure(name, node.input[0] if rearranged else None)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.extend(outputs)
    return model, same_range


# Fast bias correction averages the inputs and outputs of biased layers; a MatMul's bias is the
# Add after it in the ONNX (a Gemm once folded).
_BIASED_LAYERS = ("Conv", "MatMul", "Gemm")


def _channel_mean_tensors(wiring: Wiring) -> set[str]:
    """The inputs and outputs of biased layers, and the scaled biased outputs
    (``_scaled_biased_outputs``), with their rearrangements (a backend may drop or move a Reshape
    or Transpose next to a layer)."""
    names = _scaled_biased_outputs(wiring)
    for node in wiring.ordered:
        if node.op_type in _BIASED_LAYERS:
            names.update(node.input[:1])
            names.update(node.output)
        elif node.op_type == "Add" and any(
                getattr(wiring.producers.get(name), "op_type", None) == "MatMul"
                for name in node.input):
            names.update(node.output)
    return wiring.joined(names, _REARRANGING)


def _channel_range_tensors(wiring: Wiring) -> set[str]:
    """The inputs of grouped (depthwise) convolutions, which a CPU quantizes per channel, and the
    scaled biased outputs (``_scaled_biased_outputs``), with their rearrangements."""
    names = {node.input[0] for node in wiring.ordered if node.op_type == "Conv" and any(
        attribute.name == "group" and attribute.i > 1 for attribute in node.attribute)}
    return wiring.joined(names | _scaled_biased_outputs(wiring), _REARRANGING)


def _scaled_biased_outputs(wiring: Wiring) -> set[str]:
    """Outputs of ``(x + b) * s`` with constant ``b`` and ``s`` (``b`` also a layer's bias, as in
    a layer scale after a biased convolution). OpenVINO computes them as ``x * s + b * s``, and
    NNCF then observes ``x * s``: its range is the per-channel range of the output less ``b * s``,
    its channel means the output's less ``b * s``."""
    nodes = wiring.ordered
    constants = set(wiring.initializers)
    constants.update(out for node in nodes if node.op_type == "Constant" for out in node.output)
    constants.update(node.output[0] for node in nodes
                     if node.op_type == "Identity" and node.input[0] in constants)

    def adds_a_constant(name: str) -> bool:
        node = wiring.producers.get(name)
        if node is None:
            return False
        if node.op_type in ("Conv", "Gemm"):
            return len(node.input) > 2 and node.input[2] in constants
        return node.op_type == "Add" and any(operand in constants for operand in node.input)

    return {node.output[0] for node in nodes if node.op_type == "Mul"
            and any(operand in constants for operand in node.input)
            and any(adds_a_constant(operand) for operand in node.input)}


def _reductions(name: str, value_range: bool, channel_means: bool,
                channel_ranges: bool) -> tuple[list, list]:
    """(nodes, [(output name, element type)]) reducing tensor ``name``, rank-agnostic: the
    ONNX's shapes are computed at run time (Reshape targets come from Shape nodes)."""
    from onnx import TensorProto, helper

    def out(field):
        return f"{name}{_SEPARATOR}{field}"

    nodes = [helper.make_node("Shape", [name], [out("shape")])]
    outputs = [(out("shape"), TensorProto.INT64)]
    if value_range:
        nodes += [helper.make_node("ReduceMin", [name], [out("min")], keepdims=0),
                  helper.make_node("ReduceMax", [name], [out("max")], keepdims=0)]
        outputs += [(out("min"), TensorProto.FLOAT), (out("max"), TensorProto.FLOAT)]
    if channel_ranges:
        # Per axis-1 channel of a batch-1 tensor: reduce axis 1 of Flatten(2); per last-axis
        # channel: axis 0 of Flatten(-1).
        for suffix, flatten_axis, reduce_axis in (("axis1", 2, 1), ("last", -1, 0)):
            flat = out(f"range_{suffix}_flat")
            nodes.append(helper.make_node("Flatten", [name], [flat], axis=flatten_axis))
            for field, op in ((f"min_{suffix}", "ReduceMin"), (f"max_{suffix}", "ReduceMax")):
                nodes.append(helper.make_node(op, [flat], [out(field)], axes=[reduce_axis],
                                              keepdims=0))
                outputs.append((out(field), TensorProto.FLOAT))
    if channel_means:
        # Flatten(axis=k) makes (d0*...*d(k-1), rest): for a batch-1 tensor the mean over axis 1
        # of Flatten(2) is the mean per axis-1 channel, over axis 0 of Flatten(-1) per last.
        for field, flatten_axis, mean_axis in (("mean_axis1", 2, 1), ("mean_last", -1, 0)):
            flat = out(f"{field}_flat")
            nodes.append(helper.make_node("Flatten", [name], [flat], axis=flatten_axis))
            nodes.append(helper.make_node("ReduceMean", [flat], [out(field)], axes=[mean_axis],
                                          keepdims=0))
            outputs.append((out(field), TensorProto.FLOAT))
    return nodes, outputs
