"""Where each layer of a precision config is in an OpenVINO model converted from the deploy
form's ONNX: the friendly names NNCF's ``IgnoredScope(names=...)`` takes.

The ONNX frontend keeps ONNX node names as friendly names, except that a Conv becomes a
``Convolution``/``GroupConvolution`` named ``<ONNX node>/WithoutBiases`` followed by an ``Add``
(its bias) named after the node; the weight names are gone. So the layers are found by their
weights, as in the ONNX graph (``backends/layer_names.py``), on the converted model itself.
"""
from __future__ import annotations

from lrformer_edge.backends.layer_names import WeightedNode, map_layers

WEIGHTED_TYPES = ("Convolution", "GroupConvolution", "MatMul")


def openvino_weighted_nodes(ov_model) -> list[WeightedNode]:
    """The convolutions and MatMuls of ``ov_model`` with a constant weight, in topological order;
    MatMuls with a constant left operand (adaptive pooling, ``ptq.pooling_matmuls``) are not
    among them."""
    nodes = []
    for op in ov_model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in WEIGHTED_TYPES:
            continue
        source = op.input_value(1).get_node()
        if source.get_type_name() != "Constant":
            continue
        weight = source.get_data()
        if kind == "GroupConvolution":  # (groups, out/groups, in/groups, kh, kw)
            weight = weight.reshape(-1, *weight.shape[2:])
        elif kind == "MatMul":
            if op.input_value(0).get_node().get_type_name() == "Constant" or weight.ndim != 2:
                continue
            if not op.get_attributes().get("transpose_b", False):
                weight = weight.T  # (in, out) -> (out, in)
        nodes.append(WeightedNode(op.get_friendly_name(), weight))
    return nodes


def openvino_layer_nodes(model, ov_model) -> dict[str, list[str]]:
    """{layer name: friendly names of its operations} for every layer of ``model`` (reference or
    deploy form) in ``ov_model``, converted from its ONNX export before quantization."""
    return map_layers(model, openvino_weighted_nodes(ov_model), "the OpenVINO model")
