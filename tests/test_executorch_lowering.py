"""The XNNPACK shaping of the deploy form (same arithmetic, nothing XNNPACK refuses left) and
the delegation report (ETDump), on the tiny variant."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("executorch", reason="the ExecuTorch tests need the executorch extra: "
                                         "pip install 'lrformer-edge[executorch]'")

from lrformer_edge.backends.executorch.delegation import DelegationReport, measure_delegation
from lrformer_edge.backends.executorch.lowering import lower_to_executorch
from lrformer_edge.backends.executorch.shaping import (
    fold_batch_norms,
    fold_constants,
    shape_for_xnnpack,
    share_identical_constants,
)
from lrformer_edge.models.deploy import to_deploy
from lrformer_edge.models.factory import create_model

SIZE = (64, 96)
aten = torch.ops.aten
# What XNNPACK cannot take and the shaping must remove (channel means are checked by shape).
REFUSED = {aten.layer_norm.default, aten.scaled_dot_product_attention.default,
           aten.chunk.default, aten.batch_norm.default, aten.matmul.default}


@pytest.fixture(scope="module")
def deployed():
    torch.manual_seed(0)
    model = create_model("lrformer-test", pretrained=False)
    for module in model.modules():  # non-trivial batch-norm statistics to fold
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return to_deploy(model.eval(), SIZE)


def test_shaping_keeps_the_arithmetic_and_leaves_nothing_xnnpack_refuses(deployed):
    example = (torch.randn(1, 3, *SIZE),)
    module = torch.export.export(deployed, example, strict=False).module()
    made = {"constants": fold_constants(module), "batch_norms": fold_batch_norms(module)}
    made.update(shape_for_xnnpack(module, example))
    made["constants_shared"] = share_identical_constants(module)
    module.recompile()
    for kind in ("constants", "batch_norms", "channel_mean_as_conv", "layer_norm_as_linears",
                 "attention_as_bmm", "constant_matmul_as_bmm", "chunk_as_slices",
                 "constants_shared"):
        assert made.get(kind, 0) > 0, f"no {kind} rewrite made: {made}"
    targets = [node.target for node in module.graph.nodes if node.op == "call_function"]
    assert not REFUSED & set(targets), REFUSED & set(targets)
    channel_means = [node for node in module.graph.nodes if node.target is aten.mean.dim
                     and list(node.args[1]) in ([1], [-3])]
    assert not channel_means
    with torch.no_grad():
        expected, shaped = deployed(*example), module(*example)
    assert torch.allclose(shaped, expected, atol=1e-5, rtol=1e-5), \
        (shaped - expected).abs().max()


class _WithFallback(torch.nn.Module):
    """A convolution XNNPACK runs and a cumulative sum it does not."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return torch.cumsum(self.conv(x), dim=1)


@pytest.mark.slow
def test_the_delegation_report_names_what_runs_outside_xnnpack():
    lowered = lower_to_executorch(_WithFallback().eval(), (32, 32), {}, log=lambda line: None)
    assert lowered.portable_ops["aten.cumsum"] == 1
    assert lowered.delegated_ops["aten.convolution"] == 1
    feed = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    report = measure_delegation(lowered.buffer, feed, runs=3,
                                delegated_ops=lowered.delegated_ops,
                                portable_ops=lowered.portable_ops)
    assert report.runs == 3 and report.method_ms > 0
    assert "aten.cumsum" in report.portable_ms and report.portable_ms["aten.cumsum"] > 0
    assert 0.0 < report.xnnpack_share < 1.0
    assert report.delegate_ms + sum(report.portable_ms.values()) <= report.method_ms * 1.05
    summary = report.summary()
    assert "XNNPACK runs 1 of 2 operators" in summary and "aten.cumsum x1" in summary
    assert DelegationReport.from_dict(report.as_dict()).summary() == summary


@pytest.mark.slow
def test_skipping_the_xnnpack_passes_that_find_nothing_gives_the_same_program(deployed,
                                                                              monkeypatch):
    from lrformer_edge.backends.executorch import lowering

    pruned = lower_to_executorch(deployed, SIZE, {}, log=lambda line: None)
    monkeypatch.setattr(lowering, "_PASS_APPLIES", {})
    full = lower_to_executorch(deployed, SIZE, {}, log=lambda line: None)
    assert pruned.delegated_ops == full.delegated_ops and not pruned.portable_ops
    assert pruned.buffer == full.buffer


class _WithSkippableOps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)
        self.act = torch.nn.PReLU()

    def forward(self, x):
        return self.act(self.norm(torch.cumsum(self.conv(x), dim=2)))


def test_the_xnnpack_passes_run_when_their_ops_are_present(monkeypatch):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge, to_edge_transform_and_lower
    from executorch.exir.dialects._ops import ops as exir_ops

    from lrformer_edge.backends.executorch import lowering

    applies = {}

    def recorded(name, test):
        def run(graph):
            applies[name] = test(graph)
            return applies[name]
        return run

    monkeypatch.setattr(lowering, "_PASS_APPLIES", {
        name: recorded(name, test) for name, test in lowering._PASS_APPLIES.items()})
    program = torch.export.export(_WithSkippableOps().eval(), (torch.randn(1, 4, 16, 16),))
    with lowering._only_applicable_xnnpack_passes():
        to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    assert applies == {"FuseBatchNormPass": True, "DecomposeBatchNorm": True,
                       "Conv1dUnsqueezePass": False, "PReLUReshapePass": False,
                       "ConvertToSDPAPass": False, "ConvertToUpsampleBilinear2d": False,
                       "RemoveGetItemPass": True}  # the batch norm's tuple
    conv1d = torch.export.export(torch.nn.Conv1d(4, 4, 3), (torch.randn(1, 4, 16),))
    assert lowering._PASS_APPLIES["Conv1dUnsqueezePass"](to_edge(conv1d).exported_program().graph)
    # The pass rewrites the ATen kernel, which this partitioner keeps as aten.prelu: built here.
    prelu = torch.fx.Graph()
    x, weight = prelu.placeholder("x"), prelu.placeholder("weight")
    prelu.output(prelu.call_function(exir_ops.edge.aten._prelu_kernel.default, (x, weight)))
    assert lowering._PASS_APPLIES["PReLUReshapePass"](prelu)
    for size, scales, rewritten in (([8, 8], None, False), (None, [2.0, 2.0], True)):
        upsample = torch.fx.Graph()
        x = upsample.placeholder("x")
        upsample.output(upsample.call_function(exir_ops.edge.aten.upsample_bilinear2d.vec,
                                               (x, size, False, scales)))
        assert lowering._PASS_APPLIES["ConvertToUpsampleBilinear2d"](upsample) == rewritten


def test_identical_constants_are_shared_and_the_copies_dropped(deployed):
    example = (torch.randn(1, 3, *SIZE),)
    module = torch.export.export(deployed, example, strict=False).module()
    fold_constants(module)
    before = len(list(module.named_buffers())) + len(list(module.named_parameters()))
    shared = share_identical_constants(module)
    module.recompile()
    after = len(list(module.named_buffers())) + len(list(module.named_parameters()))
    assert shared > 0 and after <= before - shared
    referenced = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    assert referenced == {name for name, _ in [*module.named_buffers(),
                                                *module.named_parameters()]}
    with torch.no_grad():
        assert torch.equal(module(*example), deployed(*example))
