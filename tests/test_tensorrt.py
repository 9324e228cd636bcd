"""TensorRT target: the TensorRT-ready ONNX (runs everywhere) and the engine/runner (GPU only)."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrformer_edge
from lrformer_edge.backends import MissingDependencyError, load_runner
from lrformer_edge.backends.onnxruntime.export import MAX_OPSET
from lrformer_edge.backends.onnxruntime.runner import OnnxRuntimeRunner
from lrformer_edge.backends.tensorrt import cuda as trt_cuda
from lrformer_edge.backends.tensorrt import engine as trt_engine
from lrformer_edge.backends.tensorrt.engine import (
    EngineOptions,
    build_engine,
    target_command,
    tensorrt_unavailable_reason,
)
from lrformer_edge.backends.tensorrt.export import (
    export_tensorrt_onnx,
    tensorrt_problems,
)
from lrformer_edge.backends.tensorrt.qdq import (
    pooling_matmuls,
    qdq_problems,
    to_signed_int8,
)
from lrformer_edge.backends.tensorrt.runner import TensorRTRunner
from lrformer_edge.backends.tensorrt.sidecar import read_sidecar
from lrformer_edge.data.calibration import build_calibration_set
from lrformer_edge.registry import BUNDLED_MODEL

REPO = Path(__file__).resolve().parents[1]
SIZE = (128, 128)
NO_TENSORRT = tensorrt_unavailable_reason()
needs_tensorrt = pytest.mark.skipif(
    NO_TENSORRT is not None,
    reason=f"building and running engines needs TensorRT 10.x/11.x and an NVIDIA GPU: {NO_TENSORRT}")


@pytest.fixture(scope="module")
def bundled():
    return lrformer_edge.create_model(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def int8_onnx(bundled, tmp_path_factory):
    calibration = build_calibration_set("procedural", bundled.config.data, SIZE, count=8)
    path = tmp_path_factory.mktemp("trt") / "bundled-int8.onnx"
    result = export_tensorrt_onnx(bundled, path, SIZE, "int8", calibration)
    return path, result, calibration


def _qdq_pair_graph(zero_point_type, zero_point_value=0):
    """input -> Relu -> Q -> DQ -> output, the form NNCF leaves behind ReLUs."""
    scale = numpy_helper.from_array(np.array(0.01, np.float32), "scale")
    zero = helper.make_tensor("zero", zero_point_type, [], [zero_point_value])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "scale", "zero"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], name="dq")]
    graph = helper.make_graph(
        nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [scale, zero],
        value_info=[helper.make_tensor_value_info("q", zero_point_type, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_uint8_quantizers_become_signed_int8_covering_the_same_range():
    model = _qdq_pair_graph(TensorProto.UINT8)
    assert any("zero-point type UINT8" in p for p in qdq_problems(model))
    x = np.array([[0.0, 0.5, 1.27, 2.55]], np.float32)
    before = _run(model, x)
    converted = to_signed_int8(model)
    assert qdq_problems(converted) == []
    after = _run(converted, x)
    step = 0.01 * 255 / 127
    np.testing.assert_allclose(after, before, atol=step / 2 + 1e-6)
    assert after.max() == pytest.approx(2.55, abs=step / 2)  # the top of the uint8 range is kept


def test_non_zero_zero_point_is_rejected():
    with pytest.raises(ValueError, match="not 0; TensorRT accepts symmetric"):
        to_signed_int8(_qdq_pair_graph(TensorProto.INT8, 3))


def test_int8_onnx_has_the_form_tensorrt_takes(int8_onnx):
    path, result, _ = int8_onnx
    graph = onnx.load(str(path))
    assert tensorrt_problems(graph) == []
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) <= MAX_OPSET
    inits = {i.name: i for i in graph.graph.initializer}
    qdq = [n for n in graph.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 100
    for node in qdq:
        zero_point = inits[node.input[2]]
        assert zero_point.data_type == TensorProto.INT8
        assert not numpy_helper.to_array(zero_point).any()
    weights = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weights and all(inits[n.input[0]].data_type == TensorProto.INT8 for n in weights)
    assert all(inits[n.input[1]].dims for n in weights)  # per-channel scales
    producers = {output: n.op_type for n in graph.graph.node for output in n.output}
    for node in graph.graph.node:  # sensitive ops and resizes are fed float, not int8 via DQ
        if node.op_type in ("LayerNormalization", "Softmax", "Resize"):
            assert producers.get(node.input[0]) != "DequantizeLinear", node.name
    # The exact-pooling MatMuls keep their constant averaging matrix and a float input.
    pools = pooling_matmuls(graph)
    assert pools and all(producers.get(n.input[1]) != "DequantizeLinear"
                         for n in graph.graph.node if n.name in pools)
    quantization = result.metadata["quantization"]
    assert quantization["per_channel_weights"] == quantization["int8_weights"] > 0
    assert result.metadata["calibration_set"]["sha256"] == int8_onnx[2].sha256
    assert result.metadata["target"] == "tensorrt" and result.metadata["precision"] == "int8"


def test_int8_onnx_runs_in_onnx_runtime_close_to_pytorch(int8_onnx):
    path, result, _ = int8_onnx
    assert result.parity.pixel_agreement > 0.95 and result.parity.cosine > 0.99
    with OnnxRuntimeRunner(path) as runner:
        output = runner.infer({"input": np.zeros((1, 3, *SIZE), np.float32)})["logits"]
    assert output.shape == (1, 12, *SIZE) and np.isfinite(output).all()


def test_fp16_onnx_keeps_sensitive_ops_and_io_in_fp32(bundled, tmp_path):
    result = export_tensorrt_onnx(bundled, tmp_path / "fp16.onnx", SIZE, "fp16")
    graph = onnx.load(str(result.path))
    assert tensorrt_problems(graph) == []
    assert graph.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert graph.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    halves = [i for i in graph.graph.initializer if i.data_type == TensorProto.FLOAT16]
    assert len(halves) > 50
    types = {v.name: v.type.tensor_type.elem_type for v in graph.graph.value_info}
    for node in graph.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert types.get(node.output[0], TensorProto.FLOAT) == TensorProto.FLOAT, node.name
    assert result.parity.pixel_agreement > 0.995


def _cli(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "export_scripts/to_tensorrt.py"), *args],
                          capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_cli_int8_exports_then_validates_its_onnx_without_tensorrt(tmp_path):
    """One export: without TensorRT it keeps the ONNX and prints the target's command; the
    ONNX is then validated here with --from-onnx --onnx-only (no second export)."""
    engine, onnx_path = tmp_path / "m.engine", tmp_path / "m.onnx"
    exported = _cli("--int8", "--input-size", "128", "128", "--calib-images", "4",
                    "--output", str(engine), cwd=tmp_path)
    assert "zero-points 0" in exported.stdout, exported.stderr
    assert onnx_path.is_file()  # the ONNX stays, engine or not
    if NO_TENSORRT is not None:
        assert exported.returncode == 3 and not engine.exists()
        assert "TensorRT engine NOT built" in exported.stderr
        assert f"--from-onnx {onnx_path} --int8" in exported.stderr
    validated = _cli("--from-onnx", str(onnx_path), "--int8", "--onnx-only", "--validate", "3",
                     "--output", str(engine), cwd=tmp_path)
    assert validated.returncode == 0, validated.stderr
    assert "pixel agreement" in validated.stdout and "ONNX Runtime" in validated.stdout


def test_cli_from_onnx_refuses_mismatches(int8_onnx, tmp_path):
    path, _, _ = int8_onnx
    wrong_precision = _cli("--from-onnx", str(path), "--fp16", "--output", "x.engine", cwd=tmp_path)
    assert wrong_precision.returncode == 2
    assert "is a int8 ONNX, but --fp16 was asked for" in wrong_precision.stderr
    other_set = _cli("--from-onnx", str(path), "--int8", "--calib-images", "8", "--seed", "1",
                     "--calib-data", "procedural", "--onnx-only", "--output", "x.engine",
                     cwd=tmp_path)
    assert other_set.returncode == 2 and "calibration data does not match" in other_set.stderr
    same_set = _cli("--from-onnx", str(path), "--int8", "--calib-images", "8",
                    "--calib-data", "procedural", "--onnx-only", "--output", "x.engine",
                    cwd=tmp_path)
    assert same_set.returncode == 0, same_set.stderr
    assert "calibration data matches" in same_set.stdout


def test_cli_rejects_bad_options(tmp_path):
    assert _cli("--output", "x.engine", cwd=tmp_path).returncode == 2  # no precision
    bad = _cli("--int8", "--output", "x.onnx", cwd=tmp_path)
    assert bad.returncode == 2 and "--output must end in .engine" in bad.stderr
    missing = _cli("--int8", "--from-onnx", "nope.onnx", "--output", "x.engine", cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_engine_runner_reports_what_it_needs(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(ValueError, match="has no sidecar"):
        _ = load_runner(engine).metadata
    if NO_TENSORRT is not None:
        runner = load_runner(engine)
        with pytest.raises((MissingDependencyError, RuntimeError),
                           match="tensorrt|NVIDIA GPU"):
            runner.activate()


RUNTIME_EXTRA = "pip install 'lrformer-edge[tensorrt-runtime]'"


def test_a_missing_tensorrt_runtime_names_the_extra_that_installs_it(tmp_path, monkeypatch):
    """'tensorrt' is the extra for the Q/DQ ONNX (NNCF); TensorRT itself and cuda-python come
    with 'tensorrt-runtime'."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt: ImportError
    assert RUNTIME_EXTRA in tensorrt_unavailable_reason()
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(MissingDependencyError) as missing:
        TensorRTRunner(engine).activate()
    assert RUNTIME_EXTRA in str(missing.value) and "lrformer-edge[tensorrt]'" not in str(
        missing.value)
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(trt_engine, "cuda_gpu_name", lambda: None)
    assert "no NVIDIA GPU" in tensorrt_unavailable_reason()
    assert RUNTIME_EXTRA in tensorrt_unavailable_reason()
    monkeypatch.setattr(trt_cuda, "_cudart", lambda: None)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"lrformer-edge\[tensorrt-runtime\]"):
        trt_cuda.cuda_device()


def test_target_command_repeats_the_engine_options_and_the_validation():
    options = EngineOptions(workspace_mib=512, dla_core=0, timing_cache=Path("trt.cache"))
    command = target_command(Path("out dir/m.onnx"), "int8", Path("m.engine"), options,
                             ["--validate", "5", "--variant", "lrformer-t"])
    assert shlex.split(command) == [
        "python", "export_scripts/to_tensorrt.py", "--from-onnx", "out dir/m.onnx", "--int8",
        "--output", "m.engine", "--workspace", "512", "--dla-core", "0",
        "--timing-cache", "trt.cache", "--validate", "5", "--variant", "lrformer-t"]


# A linear layer (a Gemm once constant-folded), a shared depthwise convolution (one node per
# block) and a convolution with its BatchNorm folded, whose input quantizer NNCF then moves.
MIXED_FLOAT_LAYERS = ("backbone.block2.0.attn.kv.0", "backbone.d_convs1.0",
                      "decode_head.squeeze1.conv")
MIXED_SIZE = (64, 64)
SHAPE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


@pytest.fixture(scope="module")
def mixed_qdq(tmp_path_factory):
    """(config, plain Q/DQ ExportResult, the config's, the statistics cache's stat before and
    after the config's export) for the tiny model: plain first, so the config's export finds
    its statistics in the cache."""
    from lrformer_edge.artifacts.precision_config import PrecisionConfig
    from lrformer_edge.models.reference_weights import manifest_of, reference_state_dict

    tiny = lrformer_edge.create_model("lrformer-test")
    tiny.load_state_dict(reference_state_dict(manifest_of(tiny)))
    calibration = build_calibration_set("procedural", tiny.config.data, MIXED_SIZE, count=4)
    folder = tmp_path_factory.mktemp("mixed-qdq")
    cache = folder / "statistics.npz"
    plain = export_tensorrt_onnx(tiny, folder / "plain.onnx", MIXED_SIZE, "int8", calibration,
                                 statistics_cache=cache)
    before = cache.stat()
    config = PrecisionConfig("int8", {layer: "float" for layer in MIXED_FLOAT_LAYERS},
                             variant=tiny.config.name, input_size=MIXED_SIZE)
    mixed = export_tensorrt_onnx(tiny, folder / "mixed.onnx", MIXED_SIZE, "int8", calibration,
                                 statistics_cache=cache, precision_config=config)
    return config, plain, mixed, before, cache.stat()


def _dequantized_inputs(graph) -> dict[str, list[bool]]:
    """{Conv/MatMul/Gemm node: per input (activation, weight), whether a DequantizeLinear feeds
    it, looking through shape-only nodes}."""
    producers = {out: node for node in graph.graph.node for out in node.output}

    def from_dequantize(name: str) -> bool:
        node = producers.get(name)
        while node is not None and node.op_type in SHAPE_OPS:
            node = producers.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    return {node.name: [from_dequantize(name) for name in node.input[:2]]
            for node in graph.graph.node if node.op_type in ("Conv", "MatMul", "Gemm")}


@pytest.mark.slow
def test_int8_onnx_with_a_precision_config_has_no_qdq_on_its_float_layers(mixed_qdq):
    from lrformer_edge.backends.onnxruntime.format import read_onnx_metadata
    from lrformer_edge.backends.tensorrt.precisions import trtexec_command
    from lrformer_edge.backends.tensorrt.qdq import FLOAT_TYPES

    config, plain, mixed, before, after = mixed_qdq
    # The plain export's statistics cover the config's, the moved input quantizer of the
    # folded-BatchNorm convolution included: nothing was measured again.
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    graph = onnx.load(str(mixed.path))
    assert tensorrt_problems(graph) == []  # TensorRT 10 operators, int8 Q/DQ, zero-points 0
    metadata = read_onnx_metadata(mixed.path)
    assert metadata["precision_config"] == config.metadata()
    float_nodes = [n for layer in MIXED_FLOAT_LAYERS for n in metadata["float_layer_nodes"][layer]]
    mixed_inputs = _dequantized_inputs(graph)
    plain_inputs = _dequantized_inputs(onnx.load(str(plain.path)))
    for name in float_nodes:
        assert mixed_inputs[name] == [False, False], name
        assert plain_inputs[name][1], name  # plain INT8 quantized its weight
    int8_weights = sum(weight for _, weight in mixed_inputs.values())
    assert int8_weights == sum(weight for _, weight in plain_inputs.values()) - len(float_nodes)
    # The layer-precision list names nodes of this graph: the float layers in FP16, the
    # operators kept in FP32 everywhere pinned there.
    precisions = metadata["layer_precisions"]
    kinds = {node.name: node.op_type for node in graph.graph.node}
    assert {n for n, p in precisions.items() if p == "fp16"} == set(float_nodes)
    assert {n for n, p in precisions.items() if p == "fp32"} == \
        {n for n, op in kinds.items() if op in FLOAT_TYPES}
    line = shlex.split(trtexec_command(mixed.path, "m.engine", precisions))
    listed = dict(item.split(":") for item in
                  next(a for a in line if a.startswith("--layerPrecisions=")).split("=", 1)[1]
                  .split(","))
    assert listed == precisions and "--precisionConstraints=prefer" in line
    assert mixed.parity.cosine > 0.999 and mixed.parity.pixel_agreement > 0.9


def test_layer_precisions_apply_by_layer_name_in_a_weakly_typed_build():
    """The engine builder's use of the list, as far as it runs without TensorRT: a stand-in for
    TensorRT's network and builder config (the real build is checked on a GPU below)."""
    from lrformer_edge.backends.tensorrt.engine import network_typing
    from lrformer_edge.backends.tensorrt.precisions import apply_layer_precisions

    trt = types.SimpleNamespace(
        float16="half", float32="float",
        BuilderFlag=types.SimpleNamespace(FP16="FP16", INT8="INT8",
                                          PREFER_PRECISION_CONSTRAINTS="PREFER"))
    layers = [types.SimpleNamespace(name=n, precision=None)
              for n in ("/a/Conv", "/a/Conv_1", "/b/LayerNormalization", "/c/Add")]
    network = types.SimpleNamespace(num_layers=len(layers), get_layer=layers.__getitem__)
    flags = set()
    config = types.SimpleNamespace(set_flag=flags.add)
    precisions = {"/a/Conv": "fp16", "/b/LayerNormalization": "fp32"}
    assert apply_layer_precisions(trt, network, config, precisions) == 2
    assert [layer.precision for layer in layers] == ["half", None, "float", None]
    assert flags == {"FP16", "INT8", "PREFER"}
    with pytest.raises(RuntimeError, match="no layer named /a/Gemm"):
        apply_layer_precisions(trt, network, config, {**precisions, "/a/Gemm": "fp16"})
    metadata = {"layer_precisions": precisions}
    assert network_typing(metadata, "10.3.0")[:2] == (False, precisions)
    strongly, applied, notes = network_typing(metadata, "11.0.0")
    assert strongly and applied == {} and "run in FP32" in notes[0]
    assert network_typing({}, "10.3.0") == (True, {}, [])


def test_the_layer_precision_list_pins_float_types_and_refuses_unusable_names():
    from lrformer_edge.backends.tensorrt.precisions import layer_precisions

    graph = _qdq_pair_graph(TensorProto.INT8)  # relu -> q -> dq
    graph.graph.node.append(helper.make_node("Softmax", ["y"], ["s"], name="softmax"))
    assert layer_precisions(graph, []) == {}  # nothing kept in float: built like plain INT8
    assert layer_precisions(graph, ["relu"]) == {"softmax": "fp32", "relu": "fp16"}
    graph.graph.node[0].name = "relu:0"
    with pytest.raises(ValueError, match="cannot be given to TensorRT's layer precisions"):
        layer_precisions(graph, ["relu:0"])


def test_a_precision_config_goes_with_post_training_int8_only(tmp_path):
    refused = _cli("--fp16", "--precision-config", "c.json", "--output", "x.engine", cwd=tmp_path)
    assert refused.returncode == 2
    assert "--precision-config goes with --int8 post-training Q/DQ only" in refused.stderr


@needs_tensorrt
def test_engine_builds_with_the_layer_precision_list(mixed_qdq, tmp_path):
    from lrformer_edge.backends.tensorrt.precisions import builds_weakly_typed

    _, _, mixed, _, _ = mixed_qdq
    result = build_engine(mixed.path, tmp_path / "mixed.engine")
    import tensorrt as trt

    weakly = builds_weakly_typed(trt.__version__)
    assert result.sidecar["strongly_typed"] is not weakly
    assert bool(result.sidecar["layer_precisions"]) is weakly
    feed = {"input": np.zeros((1, 3, *MIXED_SIZE), np.float32)}
    with load_runner(result.path) as engine:
        assert np.isfinite(engine.infer(feed)["logits"]).all()


@needs_tensorrt
def test_engine_builds_runs_and_matches_onnx_runtime(int8_onnx, tmp_path):
    path, _, calibration = int8_onnx
    cache = tmp_path / "timing.cache"
    result = build_engine(path, tmp_path / "m.engine", EngineOptions(timing_cache=cache))
    sidecar = read_sidecar(result.path)
    assert sidecar["precision"] == "int8" and sidecar["calibration_sha256"] == calibration.sha256
    assert cache.is_file()
    feed = {"input": calibration.batches[0]}
    with load_runner(result.path) as engine, OnnxRuntimeRunner(path) as ort_runner:
        trt_logits = engine.infer(feed)["logits"]
        ort_logits = ort_runner.infer(feed)["logits"]
    assert (trt_logits.argmax(1) == ort_logits.argmax(1)).mean() > 0.98
    rebuilt = build_engine(path, tmp_path / "again.engine", EngineOptions(timing_cache=cache))
    assert json.loads(json.dumps(rebuilt.sidecar))["onnx_sha256"] == sidecar["onnx_sha256"]
