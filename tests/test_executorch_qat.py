"""QAT models to ExecuTorch INT8 (XNNPACK): NNCF's quantizers in PT2E form, the rewrites that
XNNPACK's int8 ops need, and the export through the registry (``calibration/qat.py --target
executorch``)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("executorch")
pytest.importorskip("torchao")

from lrformer_edge.backends.executorch.qat import (  # noqa: E402
    QAT_REQUANTIZED_PARITY,
    _QuantizeDequantize,
    fold_batch_norms,
    int8_weights,
    private_dequantizes,
    quantize_gemm_inputs,
    requantization_images,
    requantize_gemm_outputs,
)

SIZE = (64, 64)


def _fake_quantize(scale, zero_point, low, high, per_channel=False, axis=0):
    """What the QDQ pairs read of a torch FakeQuantize (as ``nncf.strip`` makes them)."""
    scheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
    return SimpleNamespace(scale=torch.as_tensor(scale, dtype=torch.float32),
                           zero_point=torch.as_tensor(zero_point, dtype=torch.int32),
                           quant_min=low, quant_max=high, qscheme=scheme, ch_axis=axis)


def test_qdq_pairs_compute_what_the_fake_quantizers_compute():
    x = torch.linspace(-3, 14, 997).reshape(1, 1, -1)  # past both ends of every range
    unsigned = _QuantizeDequantize(_fake_quantize(0.05, 0, 0, 255))  # after a ReLU
    assert unsigned.bounds == (-128, 127) and unsigned.zero_point == -128  # the same grid
    assert torch.equal(unsigned(x), torch.fake_quantize_per_tensor_affine(x, 0.05, 0, 0, 255))
    signed = _QuantizeDequantize(_fake_quantize(0.03, 0, -128, 127))
    assert torch.equal(signed(x), torch.fake_quantize_per_tensor_affine(x, 0.03, 0, -128, 127))
    weights = torch.randn(4, 3, 3, 3)
    scales = weights.abs().amax(dim=(1, 2, 3)) / 127
    per_channel = _QuantizeDequantize(_fake_quantize(scales, [0] * 4, -127, 127, True))
    expected = torch.fake_quantize_per_channel_affine(
        weights, scales, torch.zeros(4, dtype=torch.int32), 0, -127, 127)
    assert torch.equal(per_channel(weights), expected)
    with pytest.raises(ValueError, match="8-bit quantizers only"):
        _QuantizeDequantize(_fake_quantize(0.1, 0, -512, 511))


class _NNCFStyle(nn.Module):
    """NNCF's placement in small: quantizers on the inputs of the convolution and the linear
    (one reached through a permute), a BatchNorm after the convolution, float outputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.norm, self.linear = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), \
            nn.Linear(8, 8)
        self.norm.running_mean.uniform_(-0.5, 0.5)
        self.norm.running_var.uniform_(0.5, 2.0)
        self.norm.weight.data.uniform_(-1.5, 1.5)  # negative factors flip weight signs
        self.conv_weight, self.linear_weight = (
            _QuantizeDequantize(_fake_quantize(w.abs().amax(dim=tuple(range(1, w.dim()))) / 127,
                                               [0] * w.shape[0], -127, 127, True))
            for w in (self.conv.weight, self.linear.weight))
        self.image = _QuantizeDequantize(_fake_quantize(0.02, 0, -128, 127))
        self.features = _QuantizeDequantize(_fake_quantize(0.03, 0, 0, 255))
        self.eval()

    def forward(self, x):
        y = F.conv2d(self.image(x), self.conv_weight(self.conv.weight), self.conv.bias,
                     padding=1)
        features = self.features(F.relu(self.norm(y)))
        z = F.linear(features.permute(0, 2, 3, 1), self.linear_weight(self.linear.weight),
                     self.linear.bias)
        return z + features.permute(0, 2, 3, 1)  # float: the linear's output is not quantized


@pytest.fixture()
def nncf_style():
    example = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        module = int8_weights(torch.export.export(_NNCFStyle(), (example,)).module())
    return module, example


def test_per_channel_activation_scales_are_refused():
    module = _NNCFStyle()
    module.image = _QuantizeDequantize(_fake_quantize([0.02] * 4, [0] * 4, -128, 127, True, 1))
    example = torch.randn(1, 4, 6, 6)
    with torch.no_grad(), pytest.raises(ValueError, match="per-tensor activation scales only"):
        int8_weights(torch.export.export(module, (example,)).module())


def _ops(module, target) -> list:
    return [node for node in module.graph.nodes if node.target == target]


def test_rewrites_keep_the_arithmetic_but_for_the_added_output_quantizers(nncf_style):
    module, x = nncf_style
    qd = torch.ops.quantized_decomposed
    with torch.no_grad():
        reference = module(x)
        assert len(_ops(module, qd.dequantize_per_channel.default)) == 2  # int8 weights
        assert fold_batch_norms(module) == 1
        assert not _ops(module, torch.ops.aten.batch_norm.default)
        assert torch.allclose(module(x), reference, atol=1e-5)
        assert quantize_gemm_inputs(module) == 1  # the linear, behind the permute
        assert torch.allclose(module(x), reference, atol=1e-5)
        # Only the linear needs an output quantizer: the convolution's (ReLU fused) is NNCF's.
        images = [torch.randn(1, 4, 6, 6) for _ in range(4)] + [x]
        assert requantize_gemm_outputs(module, images) == 1
        requantized = module(x)
        [added] = [node for node in _ops(module, qd.quantize_per_tensor.default)
                   if node.args[0].target == torch.ops.aten.linear.default]
        assert 0 < (requantized - reference).abs().max() <= added.args[1] / 2 + 1e-6
        assert private_dequantizes(module) >= 1
        assert all(len(node.users) == 1 for node in module.graph.nodes
                   if node.target in (qd.dequantize_per_tensor.default,
                                      qd.dequantize_per_channel.default))
        assert torch.equal(module(x), requantized)


def _int8_ops_in_xnnpack(module, example) -> int:
    """How many int8 convolutions/linears land in XNNPACK when lowered as the export lowers:
    each brings its weight's dequantize along (an FP32 op takes float weights only)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from lrformer_edge.backends.executorch.lowering import count_ops

    program = to_edge_transform_and_lower(torch.export.export(module, (example,)),
                                          partitioner=[XnnpackPartitioner()])
    inside, _ = count_ops(program.exported_program())
    return inside["quantized_decomposed.dequantize_per_channel"]


def test_xnnpack_takes_nncf_placed_int8_ops_only_after_the_rewrites(nncf_style):
    module, x = nncf_style
    assert _int8_ops_in_xnnpack(module, x) == 0  # why the rewrites exist
    with torch.no_grad():
        fold_batch_norms(module)
        quantize_gemm_inputs(module)
        requantize_gemm_outputs(module, [x])
        private_dequantizes(module)
    assert _int8_ops_in_xnnpack(module, x) == 2


def test_output_ranges_come_from_the_recorded_qat_calibration_set():
    from lrformer_edge.data.calibration import build_calibration_set
    from lrformer_edge.registry import get_config

    model = SimpleNamespace(config=get_config("lrformer-test"))
    recorded = build_calibration_set("procedural", model.config.data, (32, 32), 2, seed=4)
    payload = {"input_size": [32, 32], "calibration_set": recorded.describe()}
    images = requantization_images(model, payload)
    assert len(images) == 2 and all((a == b).all() for a, b in zip(images, recorded.batches))
    with pytest.raises(ValueError, match="records no calibration set"):
        requantization_images(model, {"input_size": [32, 32]})
    changed = {**payload, "calibration_set": {**recorded.describe(), "sha256": "0" * 64}}
    with pytest.raises(ValueError, match="has changed since QAT"):
        requantization_images(model, changed)


def test_executorch_is_a_qat_target_with_per_tensor_activations():
    import nncf

    from lrformer_edge.backends import get_backend
    from lrformer_edge.quant.qat import QAT_TARGETS

    backend = get_backend("executorch")
    assert "executorch" in QAT_TARGETS
    assert backend.qat_artifact_name.endswith(".pte")
    rules = backend.quantizer_rules(nncf)
    assert rules["activations_quantization_params"].per_channel is False


@pytest.mark.slow
def test_qat_model_exports_to_an_int8_pte_that_runs_in_xnnpack(tmp_path):
    pytest.importorskip("nncf")
    from lrformer_edge.backends import get_backend, load_runner
    from lrformer_edge.data.procedural import write_ade20k_layout
    from lrformer_edge.quant.qat import QATConfig, export_qat_artifacts, train_qat

    data = write_ade20k_layout(tmp_path / "data", {"training": range(4),
                                                   "validation": range(1000, 1002)}, size=SIZE)
    work = tmp_path / "qat"
    train_qat(QATConfig(data=str(data), work_dir=str(work), variant="lrformer-test",
                        target="executorch", input_size=SIZE, iters=2, batch_size=1,
                        val_interval=2, val_images=2, calib_images=3, log_interval=1),
              log=lambda *_: None)
    [result] = export_qat_artifacts(work, "executorch")
    assert result.path == work / get_backend("executorch").qat_artifact_name
    assert result.parity.cosine >= QAT_REQUANTIZED_PARITY.min_cosine
    quantization = result.metadata["quantization"]
    assert result.metadata["precision"] == "int8" and quantization["target"] == "executorch"
    assert quantization["outputs_requantized"] > 0
    # Every int8 convolution/linear runs inside XNNPACK (one weight dequantize each).
    inside = result.metadata["xnnpack_ops"]
    assert inside["quantized_decomposed.dequantize_per_channel"] == quantization["int8_ops"]
    assert not [op for op in result.metadata["portable_ops"]
                if "quantize" in op or op.endswith(("convolution", "linear"))]
    with load_runner(result.path) as runner:
        logits = next(iter(runner.infer({"input": torch.zeros(1, 3, *SIZE).numpy()}).values()))
    assert logits.shape[2:] == SIZE
