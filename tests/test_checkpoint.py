"""Loading official/our checkpoints in every container format, and rejecting bad ones."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

import lrformer_edge
from lrformer_edge.artifacts.metadata import artifact_metadata, decode_metadata
from lrformer_edge.models.checkpoint import CheckpointError, save_mmseg_checkpoint
from lrformer_edge.registry import input_size_of


@pytest.fixture(scope="module")
def trained_state():
    torch.manual_seed(1)
    model = lrformer_edge.create_model("lrformer-test")
    for param in model.parameters():
        param.data.normal_()
    return model.state_dict()


def _assert_same(model, state):
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key])


@pytest.mark.parametrize("container", ["mmseg", "plain", "model", "module", "safetensors"])
def test_every_container_loads_strictly(tmp_path, trained_state, container):
    path = tmp_path / ("ckpt.safetensors" if container == "safetensors" else "ckpt.pth")
    if container == "mmseg":
        save_mmseg_checkpoint(trained_state, path, meta={"iter": 3})
    elif container == "plain":
        torch.save(trained_state, path)
    elif container == "model":
        torch.save({"model": trained_state, "epoch": 1}, path)
    elif container == "module":
        torch.save({"state_dict": {f"module.{k}": v for k, v in trained_state.items()}}, path)
    else:
        save_file({k: v.contiguous() for k, v in trained_state.items()}, str(path))
    model = lrformer_edge.create_model("lrformer-test", checkpoint=path)
    _assert_same(model, trained_state)
    assert len(model.checkpoint_sha256) == 64


def test_num_classes_comes_from_the_checkpoint(tmp_path):
    source = lrformer_edge.create_model("lrformer-t.cityscapes")
    path = tmp_path / "city.pth"
    save_mmseg_checkpoint(source.state_dict(), path)
    model = lrformer_edge.create_model("lrformer-t", checkpoint=path)
    assert model.num_classes == 19
    assert model.config.name == "lrformer-t.cityscapes"  # its class names, not placeholders
    with pytest.raises(CheckpointError, match="19-class head but num_classes=150"):
        lrformer_edge.create_model("lrformer-t", checkpoint=path, num_classes=150)
    # The switch is said, and recorded in every artifact beside the variant it led to.
    assert model.requested_variant == "lrformer-t"
    assert model.variant_note == ("checkpoint has 19 classes: using variant "
                                  "lrformer-t.cityscapes (native size 1024x1024)")
    assert input_size_of(model) == (1024, 1024)  # every exporter's default size
    metadata = decode_metadata(artifact_metadata(model, (64, 64)))
    assert metadata["variant"] == "lrformer-t.cityscapes"
    assert metadata["requested_variant"] == "lrformer-t"


def test_no_switch_no_note(tmp_path, trained_state):
    save_mmseg_checkpoint(trained_state, tmp_path / "same.pth")
    model = lrformer_edge.create_model("lrformer-test", checkpoint=tmp_path / "same.pth")
    assert model.variant_note is None and model.requested_variant == "lrformer-test"
    assert "requested_variant" not in decode_metadata(artifact_metadata(model, (64, 64)))
    assert input_size_of(model) == (512, 512) and input_size_of(model, (64, 96)) == (64, 96)
    asked = lrformer_edge.create_model("lrformer-test", num_classes=19)
    assert asked.variant_note == ("num_classes=19: using variant lrformer-test[19 classes] "
                                  "(native size 512x512)")


def test_custom_class_count_gets_placeholder_names(tmp_path, trained_state):
    state = dict(trained_state)
    state["decode_head.conv_seg.weight"] = torch.zeros(7, 32, 1, 1)
    state["decode_head.conv_seg.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "seven.pth")
    model = lrformer_edge.create_model("lrformer-test", checkpoint=tmp_path / "seven.pth")
    assert model.num_classes == 7
    assert model.config.data.class_names[6] == "class_6"


def test_mismatch_error_lists_missing_unexpected_and_shapes(tmp_path, trained_state):
    state = dict(trained_state)
    del state["backbone.block1.0.cpe.weight"]
    state["backbone.extra.weight"] = torch.zeros(1)
    state["backbone.block1.0.attn.proj.bias"] = torch.zeros(5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as error:
        lrformer_edge.create_model("lrformer-test", checkpoint=tmp_path / "bad.pth")
    message = str(error.value)
    assert "1 missing keys: backbone.block1.0.cpe.weight" in message
    assert "1 unexpected keys: backbone.extra.weight" in message
    assert "backbone.block1.0.attn.proj.bias: checkpoint (5,) vs model (16,)" in message


def test_wrong_variant_is_reported_not_crashed(tmp_path):
    save_mmseg_checkpoint(lrformer_edge.create_model("lrformer-test").state_dict(),
                          tmp_path / "test.pth")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        lrformer_edge.create_model("lrformer-t", checkpoint=tmp_path / "test.pth",
                                   num_classes=150)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_arbitrary_pickled_objects_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": {"x": _Evil()}}, handle)
    with pytest.raises(CheckpointError, match="weights_only"):
        lrformer_edge.create_model("lrformer-test", checkpoint=path)
    assert "this must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("content, suffix", [(b"", ".pth"), (b"garbage" * 10, ".pth"),
                                             (b"garbage" * 10, ".safetensors")])
def test_corrupt_files_give_a_clear_error(tmp_path, content, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt"):
        lrformer_edge.create_model("lrformer-test", checkpoint=path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        lrformer_edge.create_model("lrformer-test", checkpoint=tmp_path / "nope.pth")


def test_load_runner_reads_the_variant_our_checkpoints_record(tmp_path, trained_state):
    from lrformer_edge.backends import load_runner
    from lrformer_edge.backends.pytorch.runner import TorchRunner

    save_mmseg_checkpoint(trained_state, tmp_path / "ours.pth", meta={"variant": "lrformer-test"})
    runner = load_runner(tmp_path / "ours.pth")
    assert isinstance(runner, TorchRunner) and runner.model.config.name == "lrformer-test"
    torch.save(trained_state, tmp_path / "official.pth")
    with pytest.raises(ValueError, match="variant='lrformer-t'"):
        load_runner(tmp_path / "official.pth")
    with pytest.raises(ValueError, match="cannot tell which backend"):
        (tmp_path / "model.xyz").write_bytes(b"")
        load_runner(tmp_path / "model.xyz")


@pytest.mark.parametrize("container, bad", [("pth", float("nan")), ("pth", float("inf")),
                                            ("safetensors-fp16", float("nan"))])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, trained_state, container,
                                                          bad):
    key = "backbone.block1.0.attn.proj.weight"
    state = {k: v.clone() for k, v in trained_state.items()}
    state[key][0, :3] = bad
    if container == "pth":
        path = tmp_path / "diverged.pth"
        save_mmseg_checkpoint(state, path)
    else:
        path = tmp_path / "diverged.safetensors"
        save_file({k: v.half().contiguous() if v.is_floating_point() else v.contiguous()
                   for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError) as error:
        lrformer_edge.create_model("lrformer-test", checkpoint=path)
    message = str(error.value)
    assert message.startswith(f"checkpoint {path}: tensor '{key}' has 3 non-finite values "
                              f"(NaN/Inf)")
    assert "more tensors" not in message and "\n" not in message


def test_every_non_finite_tensor_is_counted(tmp_path, trained_state):
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in trained_state.items()}
    torch.save(state, tmp_path / "nan.pth")
    floating = sum(v.is_floating_point() for v in state.values())
    with pytest.raises(CheckpointError, match=f"non-finite values \\(NaN/Inf\\) \\(and "
                                              f"{floating - 1} more tensors\\)"):
        lrformer_edge.create_model("lrformer-test", checkpoint=tmp_path / "nan.pth")


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    """torch.load's own message advises weights_only=False, which is wrong (and unsafe) here."""
    import numpy as np

    from lrformer_edge.models.checkpoint import checkpoint_format

    path = tmp_path / "weights.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert checkpoint_format(path) is None
    with pytest.raises(CheckpointError) as error:
        lrformer_edge.create_model("lrformer-test", checkpoint=path)
    message = str(error.value)
    assert message.startswith(f"{path} is not a checkpoint: neither a PyTorch file")
    assert "safetensors" in message and ".pth" in message
    assert "weights_only" not in message


def test_formats_are_told_by_content_not_name(tmp_path, trained_state):
    from lrformer_edge.models.checkpoint import checkpoint_format

    save_file({k: v.contiguous() for k, v in trained_state.items()}, str(tmp_path / "st.pth"))
    torch.save(trained_state, tmp_path / "zip.pth")
    torch.save(trained_state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert [checkpoint_format(tmp_path / n) for n in ("st.pth", "zip.pth", "legacy.pth")] == \
        ["safetensors", "zip", "pickle"]
    _assert_same(lrformer_edge.create_model("lrformer-test", checkpoint=tmp_path / "st.pth"),
                 trained_state)
