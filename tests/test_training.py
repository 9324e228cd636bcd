"""Training: the official recipe's pieces, a short real run with resume, and DDP on 2 CPUs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lrformer_edge
from lrformer_edge.data.procedural import write_ade20k_layout
from lrformer_edge.training import (
    AugmentedSegmentation,
    DistInfo,
    TrainConfig,
    lr_factor,
    parameter_groups,
    train,
    training_batches,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "procedural"
    return write_ade20k_layout(root, {"training": range(8), "validation": range(1000, 1002)},
                               size=(64, 64))


def test_schedule_warms_up_then_decays_linearly():
    assert lr_factor(0, 100, 10, 1e-6) == pytest.approx(1e-6)
    assert lr_factor(5, 100, 10, 1e-6) == pytest.approx(0.5, abs=1e-5)
    assert lr_factor(10, 100, 10, 1e-6) == 1.0
    assert lr_factor(55, 100, 10, 1e-6) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, 1e-6) == 0.0


def test_head_learns_ten_times_faster_and_norms_do_not_decay():
    model = lrformer_edge.create_model("lrformer-test")
    groups = parameter_groups(model, 1e-4, 0.01, 10.0)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["decode_head.conv_seg.weight"])]["lr"] == pytest.approx(1e-3)
    assert by_param[id(named["backbone.block1.0.attn.q.0.weight"])]["lr"] == pytest.approx(1e-4)
    assert by_param[id(named["backbone.block1.0.norm1.weight"])]["weight_decay"] == 0.0
    assert by_param[id(named["backbone.block3.0.layer_scale_1"])]["weight_decay"] == 0.0
    assert by_param[id(named["backbone.block1.0.mlp.fc1.weight"])]["weight_decay"] == 0.01


def test_a_resumed_run_continues_the_shuffled_batches_where_it_stopped(tiny_dataset):
    from lrformer_edge.data.datasets import open_dataset

    data = lrformer_edge.get_config("lrformer-test").data

    def batches(start_iter):
        augmented = AugmentedSegmentation(open_dataset(tiny_dataset, "train"), data.mean,
                                          data.std, (64, 64), (64, 64), (0.5, 2.0), seed=3)
        return training_batches(augmented, 2, DistInfo(), seed=3, start_iter=start_iter)

    fresh = batches(0)
    first_epoch = [next(fresh) for _ in range(4)]  # 8 images in batches of 2
    second_epoch = next(fresh)
    resumed = next(batches(4))  # iteration 4 is the first of epoch 1
    assert all(torch.equal(a, b) for a, b in zip(resumed, second_epoch))
    assert not torch.equal(resumed[0], first_epoch[0][0])  # reshuffled and re-augmented
    again = next(batches(0))
    assert all(torch.equal(a, b) for a, b in zip(again, first_epoch[0]))  # seeded


def _config(data, work_dir, **overrides):
    values = dict(variant="lrformer-test", data=str(data), work_dir=str(work_dir), iters=4,
                  batch_size=2, crop_size=(64, 64), lr=1e-3, warmup_iters=1, val_interval=2,
                  log_interval=2, checkpoint_interval=2, num_workers=0, threads=1)
    values.update(overrides)
    return TrainConfig(**values)


def test_short_run_writes_mmseg_checkpoints_and_resumes(tiny_dataset, tmp_path, capsys):
    summary = train(_config(tiny_dataset, tmp_path, iters=2))
    assert summary["history"][0]["iter"] == 2
    checkpoint = torch.load(tmp_path / "latest.pth", weights_only=True)
    assert set(checkpoint) >= {"meta", "state_dict", "optimizer"}
    assert checkpoint["meta"]["iter"] == 2
    assert checkpoint["meta"]["dataset_meta"]["classes"][0] == "sky"
    assert all(k.startswith(("backbone.", "decode_head.")) for k in checkpoint["state_dict"])
    # The checkpoint is a regular model checkpoint too.
    model = lrformer_edge.create_model("lrformer-test", checkpoint=tmp_path / "best_mIoU.pth")
    assert model.num_classes == 12

    resumed = train(_config(tiny_dataset, tmp_path, iters=4, resume=True))
    assert "resumed from" in capsys.readouterr().out
    assert [h["iter"] for h in resumed["history"]] == [4]
    assert torch.load(tmp_path / "latest.pth", weights_only=True)["meta"]["iter"] == 4


def test_class_count_mismatch_is_explained(tiny_dataset, tmp_path):
    source = lrformer_edge.create_model("lrformer-test")  # 150 classes
    torch.save({"state_dict": source.state_dict()}, tmp_path / "ade150.pth")
    with pytest.raises(ValueError, match="12 classes but the model's head has 150"):
        train(_config(tiny_dataset, tmp_path, checkpoint=str(tmp_path / "ade150.pth")))


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tiny_dataset, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(_free_port()), str(REPO / "calibration" / "train.py"),
               "--variant", "lrformer-test", "--data", str(tiny_dataset),
               "--work-dir", str(tmp_path), "--iters", "2", "--batch-size", "2",
               "--crop-size", "64", "64", "--val-interval", "2", "--log-interval", "1",
               "--checkpoint-interval", "2", "--num-workers", "0", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert result.stdout.count("iter 2: val mIoU") == 1  # logged once, by rank 0
    checkpoint = torch.load(tmp_path / "latest.pth", weights_only=True)
    assert checkpoint["meta"]["iter"] == 2
