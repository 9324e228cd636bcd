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
def test_cli_int8_onnx_only_then_without_tensorrt(tmp_path):
    common = ["--int8", "--input-size", "128", "128", "--calib-images", "4",
              "--output", str(tmp_path / "m.engine")]
    done = _cli(*common, "--onnx-only", "--validate", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m.onnx").is_file() and not (tmp_path / "m.engine").exists()
    assert "pixel agreement" in done.stdout and "zero-points 0" in done.stdout
    if NO_TENSORRT is None:
        return  # the rest is about machines without TensorRT
    missing = _cli(*common, cwd=tmp_path)
    assert missing.returncode == 3
    assert "TensorRT engine NOT built" in missing.stderr
    assert f"--from-onnx {tmp_path / 'm.onnx'} --int8" in missing.stderr
    assert (tmp_path / "m.onnx").is_file()  # the ONNX stays


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
