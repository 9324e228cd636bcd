"""NNCF tensor collectors filled from the shared activation statistics
(``activation_statistics``), for NNCF's ONNX and OpenVINO backends.

A statistic point names a node and a port of the backend's graph; ``onnx_tensor_resolver`` and
``openvino_tensor_resolver`` name the FP32 ONNX tensor it observes (OpenVINO keeps the ONNX
tensor names on the outputs it converted). ``fill_collector`` then hands each of the collector's
aggregators what its reducer would have given it per image, so NNCF aggregates exactly as after
its own pass. A point nothing here can answer is left to NNCF's pass: weights (constant; NNCF
reads them from one image), a reduction the pass kept no statistic for, a tensor the ONNX does
not name.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lrformer_edge.backends.activation_statistics import (
    ActivationStatistics,
    TensorStatistics,
    Wiring,
)


@dataclass(frozen=True)
class ObservedTensor:
    """The ONNX tensor a statistic point observes; ``bias`` is what the backend's tensor lacks of
    it (OpenVINO's ``X/WithoutBiases`` output: the ONNX convolution's output before its bias);
    ``shape``, where given, is the backend tensor's, a reshaped view of the ONNX tensor (ONNX
    Runtime's MatMul+Add fusion flattens a Gemm's input and output to 2-D)."""

    name: str
    bias: np.ndarray | None = None
    shape: tuple[int, ...] | None = None

    def statistics(self, measured: ActivationStatistics) -> TensorStatistics:
        statistics = measured[self.name]
        return statistics if self.shape is None else statistics.viewed_as(self.shape)


Resolver = Callable[[object], "ObservedTensor | None"]
RESHAPING = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
FUSED_MATMUL_ADD = "/MatMulAddFusion"  # ONNX Runtime's name suffix for a MatMul+Add Gemm


def is_activation_point(target_point) -> bool:
    from nncf.common.graph.transformations.commands import TargetType

    return target_point.type in (TargetType.PRE_LAYER_OPERATION,
                                 TargetType.POST_LAYER_OPERATION)


def onnx_tensor_resolver(model, graph, measured: ActivationStatistics, fp32_onnx) -> Resolver:
    """For NNCF's ONNX backend: ``model`` the ``onnx.ModelProto`` NNCF quantizes, constant folded
    from the FP32 ONNX at ``fp32_onnx``; ``graph`` its NNCFGraph (whose input nodes are NNCF's
    own). ONNX Runtime's folding renames some tensors: MatMul+Add becomes Reshape, Gemm,
    Reshape, and consecutive Reshapes merge. Such a tensor is found in the FP32 ONNX by
    walking Reshape-like nodes to a tensor or a node both graphs name, then taking the
    reshaped view of the same values that has its shape (or at least its last axis)."""
    import onnx
    from nncf.common.graph.transformations.commands import TargetType

    folded = Wiring(model.graph)
    fp32 = Wiring(onnx.load(str(fp32_onnx), load_external_data=False).graph)

    def fp32_name(name: str, forward: bool) -> str | None:
        for _ in range(len(folded.nodes)):
            if name in measured:
                return name
            if forward:
                readers = folded.consumers.get(name, [])
                known = [n for n in readers if _same_node(n, fp32.nodes.get(n.name))]
                if known:
                    return fp32.nodes[known[0].name].input[list(known[0].input).index(name)]
                node = readers[0] if len(readers) == 1 else None
                name = node.output[0] if node is not None and node.op_type in RESHAPING else None
            else:
                node = folded.producers.get(name)
                if _same_node(node, fp32.nodes.get(getattr(node, "name", None))):
                    return fp32.nodes[node.name].output[list(node.output).index(name)]
                name = node.input[0] if node is not None and node.op_type in RESHAPING else None
            if name is None:
                return None
        return None

    def best_view(name: str, shape: tuple[int, ...]) -> str:
        views = [v for v in fp32.joined({name}, RESHAPING) if v in measured]
        exact = [v for v in views if measured[v].shape == shape]
        last = [v for v in views if measured[v].shape[-1:] == shape[-1:]]
        return (exact or last or [name])[0]

    def tensor_of(target_point) -> str | None:
        name, port = target_point.target_node_name, target_point.port_id
        if target_point.type == TargetType.PRE_LAYER_OPERATION:
            node = folded.nodes.get(name)
            return node.input[port] if node is not None and port < len(node.input) else None
        if name in folded.nodes:
            outputs = folded.nodes[name].output
            return outputs[port] if port < len(outputs) else None
        # NNCF's input nodes (nncf_model_input_0): the tensor its consumers read.
        for edge in graph.get_output_edges(graph.get_node_by_name(name)):
            consumer = folded.nodes.get(edge.to_node.node_name)
            if edge.output_port_id == port and consumer is not None:
                return consumer.input[edge.input_port_id]
        return None

    def fused_matmul_add(target_point) -> str | None:
        """The FP32 tensor at a Gemm ONNX Runtime fused from ``X`` (MatMul) and its bias Add:
        X's input, the Add's output (the Reshapes around the Gemm may have been merged or
        moved past a Transpose, so they cannot be walked)."""
        name = target_point.target_node_name
        matmul = fp32.nodes.get(name.removesuffix(FUSED_MATMUL_ADD)) \
            if name.endswith(FUSED_MATMUL_ADD) else None
        if matmul is None or matmul.op_type != "MatMul" or target_point.port_id != 0:
            return None
        if target_point.type == TargetType.PRE_LAYER_OPERATION:
            return matmul.input[0]
        adds = [n for n in fp32.consumers.get(matmul.output[0], []) if n.op_type == "Add"]
        return adds[0].output[0] if len(adds) == 1 else None

    def resolve(target_point) -> ObservedTensor | None:
        name = tensor_of(target_point)
        if name is None or name in measured:
            return None if name is None else ObservedTensor(name)
        found = fused_matmul_add(target_point) or \
            fp32_name(name, target_point.type == TargetType.POST_LAYER_OPERATION)
        found = found if found in measured else None
        shape = _edge_shape(graph, target_point)
        if found is None or shape is None:
            return None
        return ObservedTensor(best_view(found, shape), shape=shape)

    return resolve


def _same_node(node, other) -> bool:
    return node is not None and other is not None and node.op_type == other.op_type


def _edge_shape(graph, target_point) -> tuple[int, ...] | None:
    """The static shape NNCF's graph records for the tensor at ``target_point``."""
    from nncf.common.graph.transformations.commands import TargetType

    node = graph.get_node_by_name(target_point.target_node_name)
    if target_point.type == TargetType.PRE_LAYER_OPERATION:
        edges = [e for e in graph.get_input_edges(node) if e.input_port_id == target_point.port_id]
    else:
        edges = [e for e in graph.get_output_edges(node)
                 if e.output_port_id == target_point.port_id]
    shape = edges[0].tensor_shape if edges else None
    if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        return None
    return tuple(shape)


def openvino_tensor_resolver(model, graph, measured: ActivationStatistics,
                             fp32_onnx) -> Resolver:
    """For NNCF's OpenVINO backend: ``model`` the ``ov.Model`` converted from the FP32 ONNX
    (its NNCFGraph and the ONNX's path are not needed: OpenVINO keeps the ONNX tensor names)."""
    from nncf.common.graph.transformations.commands import TargetType

    ops = {op.get_friendly_name(): op for op in model.get_ops()}

    def named(output) -> str | None:
        return next((name for name in sorted(output.get_names()) if name in measured), None)

    def without_bias(output) -> ObservedTensor | None:
        consumers = list(output.get_target_inputs())
        if len(consumers) != 1:
            return None
        add = consumers[0].get_node()
        if add.get_type_name() != "Add":
            return None
        other = add.input_value(1 - consumers[0].get_index()).get_node()
        name = named(add.output(0))
        if other.get_type_name() != "Constant" or name is None:
            return None
        return ObservedTensor(name, np.asarray(other.get_data(), dtype=np.float32))

    def resolve(target_point) -> ObservedTensor | None:
        op = ops.get(target_point.target_node_name)
        if op is None:
            return None
        if target_point.type == TargetType.PRE_LAYER_OPERATION:
            output = op.input_value(target_point.port_id)
        else:
            output = op.output(target_point.port_id)
        name = named(output)
        return ObservedTensor(name) if name is not None else without_bias(output)

    return resolve


def fill_collector(collector, observed: ObservedTensor, measured: ActivationStatistics) -> bool:
    """Register in each of ``collector``'s aggregators what its reducer would have given it for
    each image of the ``observed`` tensor; False (and nothing registered) when some branch
    cannot be derived."""
    from nncf.tensor import Tensor

    statistics, bias = observed.statistics(measured), observed.bias
    reducers = {hash(reducer): reducer for reducer in collector.reducers}
    planned = []
    for (reducer_hash, port, _), aggregator in collector.aggregators.items():
        values = None if port != 0 else \
            _per_image(reducers[reducer_hash], aggregator, statistics, bias)
        if values is None:
            return False
        planned.append((aggregator, values))
    for aggregator, values in planned:
        for value in values:
            aggregator.register_reduced_input(Tensor(value))
    return True


def _per_image(reducer, aggregator, statistics: TensorStatistics, bias) -> list | None:
    from nncf.common.tensor_statistics.collectors import (
        AbsMaxReducer,
        MaxReducer,
        MeanAggregator,
        MeanPerChReducer,
        MinReducer,
        ShapeReducer,
        determine_reduction_axes,
    )

    images = len(statistics.min)
    if isinstance(reducer, ShapeReducer):
        return [np.asarray(statistics.shape, dtype=np.int32)] * images
    if isinstance(reducer, MeanPerChReducer):
        means = statistics.channel_means(reducer._channel_axis)
        if means is None or not isinstance(aggregator, MeanAggregator):
            return None
        if bias is not None:
            per_channel = _along_channels(bias, statistics.shape, reducer._channel_axis)
            if per_channel is None or per_channel.size != means.size:
                return None
            means = means - per_channel
        return [means.astype(np.float32)] * images
    kind = next((k for k in (AbsMaxReducer, MinReducer, MaxReducer) if isinstance(reducer, k)),
                None)
    if kind is None:
        return None
    rank = len(statistics.shape)
    reduced = set(determine_reduction_axes(rank, reducer._axes, reducer._axes_mode))
    if bias is not None:  # whole-tensor ranges of the values less a per-channel bias only
        if reduced != set(range(rank)):
            return None
        less_bias = _ranges_less_bias(statistics, bias)
        if less_bias is None:
            return None
        per_image = _ranges(kind, *less_bias)
        return [np.full((1,) * rank, value, dtype=np.float32) for value in per_image]
    if reduced == set(range(rank)):
        per_image = _ranges(kind, statistics.min, statistics.max)
        return [np.full((1,) * rank, value, dtype=np.float32) for value in per_image]
    if reduced == set(range(rank)) - {1} and statistics.min_axis1 is not None:
        per_image = _ranges(kind, statistics.min_axis1, statistics.max_axis1)
        keep = tuple(-1 if axis == 1 else 1 for axis in range(rank))
        return [row.reshape(keep).astype(np.float32) for row in per_image]
    return None


def _ranges_less_bias(statistics: TensorStatistics, bias: np.ndarray):
    """(per-image minima, maxima) of the tensor less ``bias``, from its per-channel ranges along
    the axis the bias varies on (None when those were not measured)."""
    rank = len(statistics.shape)
    if bias.size == 1:
        return statistics.min - bias.item(), statistics.max - bias.item()
    for axis, minima, maxima in ((1, statistics.min_axis1, statistics.max_axis1),
                                 (rank - 1, statistics.min_last, statistics.max_last)):
        per_channel = _along_channels(bias, statistics.shape, axis)
        if minima is not None and per_channel is not None and \
                per_channel.size == minima.shape[1]:
            return (minima - per_channel).min(axis=1), (maxima - per_channel).max(axis=1)
    return None


def _along_channels(bias: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray | None:
    """``bias`` as one value per channel of ``axis`` when it varies along that axis only (the
    shape it broadcasts with, right-aligned to the tensor's)."""
    rank = len(shape)
    if bias.ndim > rank:
        return None
    aligned = (1,) * (rank - bias.ndim) + bias.shape
    channel = axis % rank if rank >= 3 else rank - 1
    if any(size != 1 for position, size in enumerate(aligned) if position != channel):
        return None
    return bias.reshape(-1)


def _ranges(kind, minima: np.ndarray, maxima: np.ndarray) -> np.ndarray:
    from nncf.common.tensor_statistics.collectors import AbsMaxReducer, MinReducer

    if kind is AbsMaxReducer:
        return np.maximum(np.abs(minima), np.abs(maxima))
    return minima if kind is MinReducer else maxima
