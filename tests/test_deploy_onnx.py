"""The export-friendly form (exact static pooling) and ONNX export with parity checks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import lrformer_edge
from lrformer_edge.artifacts.parity import ParityError, ParityThresholds
from lrformer_edge.backends import load_runner
from lrformer_edge.backends.onnxruntime.export import export_onnx
from lrformer_edge.backends.onnxruntime.format import read_onnx_metadata
from lrformer_edge.backends.tensorrt.ops import tensorrt_supported_ops, unsupported_ops
from lrformer_edge.metrics import decisive_argmax_agreement
from lrformer_edge.models.deploy import adaptive_pool_matrix, to_deploy
from lrformer_edge.models.reference_weights import manifest_of, reference_state_dict
from lrformer_edge.pipeline import SegmentationPipeline

REPO = Path(__file__).resolve().parents[1]
SIZES = [(512, 512), (512, 1024), (384, 640), (736, 1280), (1024, 2048)]


@pytest.fixture(scope="module")
def randomised_tiny():
    model = lrformer_edge.create_model("lrformer-test")
    model.load_state_dict(reference_state_dict(manifest_of(model)))
    return model


@pytest.mark.parametrize("n, m", [(7, 3), (128, 11), (12, 22), (5, 16), (64, 64), (20, 6)])
def test_pool_matrix_equals_adaptive_avg_pool(n, m):
    x = torch.randn(1, 2, n, 3, dtype=torch.float64)
    expected = torch.nn.functional.adaptive_avg_pool2d(x, (m, 3))
    got = torch.einsum("mn,bcnw->bcmw", torch.from_numpy(adaptive_pool_matrix(n, m)), x)
    torch.testing.assert_close(got, expected)


def _compare(reference, size):
    """Max-abs error, and argmax agreement wherever the top-2 margin exceeds 2x the 1e-4 bound
    (near-ties flip under any float32 reordering); plus the raw agreement."""
    deployed = to_deploy(reference, size)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = reference(x).numpy(), deployed(x).numpy()
    decisive, _ = decisive_argmax_agreement(a, b, margin=2e-4)
    raw = float((a.argmax(1) == b.argmax(1)).mean())
    assert raw > 0.99999, raw
    return float(np.abs(a - b).max()), decisive


@pytest.mark.parametrize("size", SIZES)
def test_deploy_form_equals_reference_tiny(randomised_tiny, size):
    max_abs, agreement = _compare(randomised_tiny, size)
    assert max_abs < 1e-4 and agreement == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lrformer-t", "lrformer-t.procedural"])
def test_deploy_form_equals_reference_full_size(variant):
    """The reference weights at every size but 1024x2048 (half this test's time; its pooling
    matrices are checked by the tiny variant at that size, in ``..._tiny``); the bundled
    weights (the same architecture) at the two smallest."""
    model = lrformer_edge.create_model(variant)
    by_area = sorted(SIZES, key=lambda size: size[0] * size[1])
    if variant == "lrformer-t":
        model.load_state_dict(reference_state_dict(manifest_of(model)))
        sizes = by_area[:-1]
    else:
        sizes = by_area[:2]
    for size in sizes:
        max_abs, agreement = _compare(model, size)
        assert max_abs < 1e-4 and agreement == 1.0, (size, max_abs, agreement)


def test_deploy_keeps_keys_values_and_is_safe_twice(randomised_tiny):
    once = to_deploy(randomised_tiny, (384, 640))
    twice = to_deploy(to_deploy(once, (512, 512)), (384, 640))
    for model in (once, twice):
        state = model.state_dict()
        assert list(state) == list(randomised_tiny.state_dict())
        for key, value in randomised_tiny.state_dict().items():
            assert torch.equal(state[key], value)
    x = torch.randn(1, 3, 384, 640)
    with torch.no_grad():
        torch.testing.assert_close(once(x), twice(x))
    assert not hasattr(randomised_tiny, "deploy_input_size") or \
        randomised_tiny.deploy_input_size is None  # the reference is untouched


def test_mlp_residual_folding_is_exact_and_reversible(randomised_tiny):
    from lrformer_edge.models.deploy import ResidualDepthwiseConv2d

    size = (128, 192)
    folded = to_deploy(randomised_tiny, size)
    unfolded = to_deploy(folded, size, fold_mlp_residuals=False)
    convs = [m for m in folded.modules() if isinstance(m, ResidualDepthwiseConv2d)]
    assert len(convs) == sum(len(list(randomised_tiny.backbone.stages())[i][1])
                             for i in range(4)) + 2  # every backbone block and both fuse blocks
    assert not any(isinstance(m, ResidualDepthwiseConv2d) for m in unfolded.modules())
    assert not [name for name, _ in unfolded.named_buffers() if name.endswith("identity")]
    assert list(unfolded.state_dict()) == list(randomised_tiny.state_dict())
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = randomised_tiny(x)
        torch.testing.assert_close(folded(x), reference, atol=1e-4, rtol=0)
        torch.testing.assert_close(unfolded(x), reference, atol=1e-4, rtol=0)
    # The folded kernel is the official one plus the identity tap, and nothing else.
    identity = convs[0].identity
    assert identity[:, :, 1, 1].eq(1).all() and identity.sum() == identity.shape[0]
    torch.testing.assert_close(convs[0].folded_weight(), convs[0].weight + identity)


def test_deploy_form_rejects_other_sizes(randomised_tiny):
    deployed = to_deploy(randomised_tiny, (256, 256))
    with pytest.raises(ValueError, match="takes 256x256 inputs, got 256x320"):
        deployed(torch.zeros(1, 3, 256, 320))
    with pytest.raises(ValueError, match="nearest larger is 512x512"):
        to_deploy(randomised_tiny, (500, 500))


def test_onnx_export_metadata_ops_and_parity(randomised_tiny, tmp_path):
    result = export_onnx(randomised_tiny, tmp_path / "tiny.onnx", (96, 160), batch_size=None,
                         opset=17)
    assert result.parity.max_abs < 1e-4 and result.parity.pixel_agreement == 1.0
    graph = onnx.load(str(result.path))
    assert graph.opset_import[0].version <= 20
    assert unsupported_ops(graph) == {}
    meta = read_onnx_metadata(result.path)
    assert meta["variant"] == "lrformer-test" and meta["input_size"] == [96, 160]
    assert meta["mean"] == [123.675, 116.28, 103.53] and len(meta["class_names"]) == 150
    assert meta["batch_size"] == "dynamic"
    with load_runner(result.path) as runner:  # dynamic batch really is dynamic
        logits = runner.infer({"input": np.zeros((2, 3, 96, 160), np.float32)})["logits"]
    assert logits.shape == (2, 150, 96, 160)


def test_ops_are_checked_against_the_shared_tensorrt_matrix(randomised_tiny, tmp_path):
    shared = REPO.parent / "shared" / "reference" / "tensorrt10_onnx_ops.md"
    if not shared.is_file():
        pytest.skip(f"{shared} not present (a checkout keeps shared/ beside the repository)")
    assert tensorrt_supported_ops(shared) == tensorrt_supported_ops()
    result = export_onnx(randomised_tiny, tmp_path / "t.onnx", (64, 64))
    graph = onnx.load(str(result.path))
    assert unsupported_ops(graph, shared) == {}


def test_failed_parity_writes_nothing(randomised_tiny, tmp_path):
    target = tmp_path / "never.onnx"
    with pytest.raises(ParityError, match="cosine"):
        export_onnx(randomised_tiny, target, (64, 64), parity=ParityThresholds(min_cosine=1.5))
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_bad_export_options_are_rejected(randomised_tiny, tmp_path):
    with pytest.raises(ValueError, match="opset must lie in"):
        export_onnx(randomised_tiny, tmp_path / "a.onnx", (64, 64), opset=21)
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_onnx(randomised_tiny, tmp_path / "a.onx", (64, 64))


def test_pipeline_from_artifact_matches_torch_pipeline(randomised_tiny, tmp_path, rgb_image):
    path = export_onnx(randomised_tiny, tmp_path / "p.onnx", (64, 96)).path
    with SegmentationPipeline.from_artifact(path) as onnx_pipeline:
        onnx_labels = onnx_pipeline(rgb_image)
    with pytest.warns(RuntimeWarning, match="outside `with pipeline:`") as caught:
        torch_labels = SegmentationPipeline.from_model(randomised_tiny,
                                                       input_size=(64, 96))(rgb_image)
    assert caught[0].filename == __file__  # the warning points at the caller
    assert onnx_labels.shape == rgb_image.shape[:2]
    assert (onnx_labels == torch_labels).mean() > 0.999


def _cli(*args):
    return subprocess.run([sys.executable, str(REPO / "export_scripts" / "to_onnx.py"), *args],
                          capture_output=True, text=True, timeout=600)


def test_to_onnx_cli(tmp_path):
    result = _cli("--variant", "lrformer-test", "--input-size", "64", "96",
                  "--output", str(tmp_path / "cli.onnx"))
    assert result.returncode == 0, result.stderr
    assert "parity vs PyTorch" in result.stdout and (tmp_path / "cli.onnx").is_file()
    bad = _cli("--variant", "lrformer-test", "--input-size", "60", "96",
               "--output", str(tmp_path / "bad.onnx"))
    assert bad.returncode == 2 and "multiples of 32" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert _cli("--opset", "21").returncode == 2


@pytest.mark.slow
# Square and 1:2 (Cityscapes' aspect); the deploy form's own test covers 1024x2048.
@pytest.mark.parametrize("size", [(512, 512), (512, 1024)])
def test_onnxruntime_matches_pytorch_for_the_bundled_lrformer_t(tmp_path, size):
    model = lrformer_edge.create_model("lrformer-t.procedural")
    result = export_onnx(model, tmp_path / "t.onnx", size)
    assert result.parity.max_abs < 1e-3
    assert result.parity.pixel_agreement >= 0.9999
