"""Precision-config layer names on the ONNX and OpenVINO graphs (``backends/layer_names.py``):
every layer maps, every mapped name is in the graph, and the mapping partitions the graph's
quantizable nodes; on the tiny variant and on the bundled LRFormer-T (real trained weights,
shared depthwise convolutions, folded BatchNorms)."""
from __future__ import annotations

import copy
import re

import onnx
import pytest
import torch

import lrformer_edge
from lrformer_edge.backends.layer_names import (
    LayerMappingError,
    float_layer_nodes,
    map_layers,
    onnx_layer_nodes,
    onnx_weighted_nodes,
)
from lrformer_edge.backends.onnxruntime.export import export_onnx
from lrformer_edge.backends.tensorrt.export import fold_constants
from lrformer_edge.backends.tensorrt.qdq import pooling_matmuls
from lrformer_edge.models.deploy import to_deploy
from lrformer_edge.models.layers import quantizable_layers
from lrformer_edge.models.reference_weights import manifest_of, reference_state_dict
from lrformer_edge.registry import BUNDLED_MODEL

WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")


def _tiny():
    model = lrformer_edge.create_model("lrformer-test")
    model.load_state_dict(reference_state_dict(manifest_of(model)))
    return model


CASES = {"tiny": (_tiny, (64, 64)),
         "bundled": (lambda: lrformer_edge.create_model(BUNDLED_MODEL), (128, 128))}


@pytest.fixture(scope="module", params=[
    "tiny", pytest.param("bundled", marks=pytest.mark.slow)])  # bundled: ~25 s of exports
def exported(request, tmp_path_factory):
    """(model, its ONNX as exported, the same constant-folded as for TensorRT, folder)."""
    make, size = CASES[request.param]
    model = make()
    folder = tmp_path_factory.mktemp(f"names-{request.param}")
    result = export_onnx(model, folder / "model.onnx", size, parity=None)
    folded = fold_constants(result.path, folder / "folded.onnx")
    return model, onnx.load(str(result.path)), folded, folder


def _quantizable_nodes(graph) -> set[str]:
    """Conv/MatMul/Gemm nodes with a constant weight, adaptive pooling excluded (what NNCF
    would quantize), found independently of the module under test."""
    constants = {init.name for init in graph.graph.initializer}
    constants |= {out for node in graph.graph.node if node.op_type == "Constant"
                  for out in node.output}
    pools = set(pooling_matmuls(graph))
    return {node.name for node in graph.graph.node
            if node.op_type in WEIGHTED_OPS and node.input[1] in constants
            and node.name not in pools}


def _expected_node_count(model) -> int:
    """One node per layer, plus one per further block that calls a stage's shared depthwise
    convolutions (``backbone.d_convsN`` run in each block of stage N)."""
    backbone = model.backbone
    shared_calls = sum(len(getattr(backbone, f"d_convs{stage}"))
                       * (len(getattr(backbone, f"block{stage}")) - 1) for stage in range(1, 5))
    return len(quantizable_layers(model)) + shared_calls


def _assert_partition(model, mapping, graph_nodes: set[str]) -> None:
    assert list(mapping) == [layer.name for layer in quantizable_layers(model)]
    assert all(mapping.values()), "a layer without nodes"
    mapped = [node for nodes in mapping.values() for node in nodes]
    assert len(mapped) == len(set(mapped)), "a node in two layers"
    assert set(mapped) == graph_nodes
    assert len(mapped) == _expected_node_count(model)


@pytest.mark.parametrize("form", ["exported", "folded"])
def test_every_layer_maps_onto_the_onnx_graph_as_a_partition(exported, form):
    model, plain, folded, _ = exported
    graph = plain if form == "exported" else folded
    mapping = onnx_layer_nodes(model, graph)
    _assert_partition(model, mapping, _quantizable_nodes(graph))
    names = {node.name for node in graph.graph.node}
    assert all(node in names for nodes in mapping.values() for node in nodes)
    # The shared depthwise convolutions are found under every block that calls them.
    blocks = len(model.backbone.block1)
    assert len(mapping["backbone.d_convs1.0"]) == blocks
    # Linear layers are MatMuls (Gemms once constant-folded) with anonymous, transposed weights.
    linear = mapping["backbone.block1.0.attn.q.0"]
    assert len(linear) == 1 and graph.graph.node[
        [n.name for n in graph.graph.node].index(linear[0])].op_type in ("MatMul", "Gemm")


def test_the_deploy_form_maps_like_the_reference_model(exported):
    model, plain, _, _ = exported
    size = tuple(d.dim_value for d in plain.graph.input[0].type.tensor_type.shape.dim[2:])
    assert onnx_layer_nodes(to_deploy(model, size), plain) == onnx_layer_nodes(model, plain)


def test_every_layer_maps_onto_the_converted_openvino_model(exported):
    pytest.importorskip("openvino", reason="needs the openvino extra")
    import openvino as ov

    from lrformer_edge.backends.openvino.layer_names import openvino_layer_nodes
    from lrformer_edge.backends.openvino.ptq import pooling_matmuls as ov_pooling_matmuls

    model, plain, _, folder = exported
    ov_model = ov.convert_model(str(folder / "model.onnx"))
    mapping = openvino_layer_nodes(model, ov_model)
    ops = {op.get_friendly_name(): op for op in ov_model.get_ordered_ops()}
    pools = set(ov_pooling_matmuls(ov_model))
    weighted = {name for name, op in ops.items()
                if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")
                and op.input_value(1).get_node().get_type_name() == "Constant"
                and name not in pools}
    _assert_partition(model, mapping, weighted)
    # Conversion keeps ONNX node names (a convolution becomes "<node>/WithoutBiases"), except
    # where it fused a following Multiply into the weights: that operation has a generated name.
    onnx_mapping = onnx_layer_nodes(model, plain)
    for layer, names in mapping.items():
        assert len(names) == len(onnx_mapping[layer]), layer
        for name in names:
            assert name.removesuffix("/WithoutBiases") in onnx_mapping[layer] \
                or re.fullmatch(r"Multiply_\d+", name), (layer, name)


def test_a_weight_no_layer_has_is_an_error_naming_the_node(exported):
    model, plain, _, _ = exported
    changed = copy.deepcopy(model)
    with torch.no_grad():
        dict(changed.named_modules())["backbone.block1.0.attn.q.0"].weight.add_(1.0)
    with pytest.raises(LayerMappingError, match=r"match no layer.*/q/q\.0/MatMul"):
        onnx_layer_nodes(changed, plain)


def test_two_layers_with_one_weight_are_ambiguous(exported):
    model, plain, _, _ = exported
    twins = copy.deepcopy(model)
    modules = dict(twins.named_modules())
    q, proj = modules["backbone.block1.0.attn.q.0"], modules["backbone.block1.0.attn.proj"]
    assert q.weight.shape == proj.weight.shape
    with torch.no_grad():
        proj.weight.copy_(q.weight)
    with pytest.raises(LayerMappingError, match="has the weight of 2 layers"):
        map_layers(twins, onnx_weighted_nodes(plain), "the ONNX graph")


def test_the_float_layers_of_a_config_are_looked_up_in_the_mapping(exported):
    from lrformer_edge.artifacts.precision_config import PrecisionConfig

    model, plain, _, _ = exported
    mapping = onnx_layer_nodes(model, plain)
    config = PrecisionConfig("int8", {"decode_head.conv_seg": "float",
                                      "backbone.d_convs1.0": "float"})
    assert float_layer_nodes(config, lambda: mapping) == {
        "backbone.d_convs1.0": mapping["backbone.d_convs1.0"],
        "decode_head.conv_seg": mapping["decode_head.conv_seg"]}
    assert float_layer_nodes(None, lambda: pytest.fail("no config, no mapping")) == {}
    unknown = PrecisionConfig("int8", {"decode_head.nope": "float"})
    with pytest.raises(LayerMappingError, match="has no layer decode_head.nope"):
        float_layer_nodes(unknown, lambda: mapping)
