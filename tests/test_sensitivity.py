"""Per-layer quantization sensitivity (issue 21): fake quantization, the staged deploy forward,
the ranking, the selection, the reports and the command, on the tiny variant at 64x64."""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from browser import assert_renders_content, needs_chromium, rendered_dom

from lrformer_edge.artifacts.precision_config import FLOAT, PrecisionConfig
from lrformer_edge.data.calibration import build_calibration_set
from lrformer_edge.evaluation import procedural_validation_set
from lrformer_edge.models.deploy import ResidualDepthwiseConv2d, to_deploy
from lrformer_edge.models.layers import layer_macs, quantizable_layers
from lrformer_edge.quant.deploy_steps import StepState, deploy_steps, first_step_of, run_steps
from lrformer_edge.quant.fake_quant import (
    KEPT_UNDER_WEIGHT_ONLY,
    PALETTE_ENTRIES,
    PALETTE_GROUP_SIZE,
    ActivationRange,
    FakeQuantizer,
    calibrate_ranges,
    channel_factors,
    channel_scales,
    float_in_artifact,
    int_weight,
    measured_layers,
    palette_weight,
    scheme_precisions,
    stored_weight,
)
from lrformer_edge.quant.selection import (
    Bound,
    Rankings,
    SizeModel,
    raised_assignment,
    top_k_config,
    within_compute_budget,
)
from lrformer_edge.quant.sensitivity import measure_scheme, run_sensitivity, select
from lrformer_edge.quant.sensitivity_report import (
    config_path,
    render_front,
    write_sensitivity,
)
from lrformer_edge.quant.staged_evaluation import HeldOut, StagedEvaluator, kl_divergence_sum

REPO = Path(__file__).resolve().parents[1]
SIZE = (64, 64)
IMAGES = 2
CALIBRATION_IMAGES = 2  # as in COMMON and _cheap_run: one cached calibration set
TOP = 4
# Convolutions whose output goes straight into a LayerNorm over channels (a patch embedding):
# a constant added to every output channel cancels there, so it can be made huge without
# changing the FP32 model.
NORMALISED_CONVS = ("backbone.patch_embed1.conv1.9", "backbone.patch_embed2.proj",
                    "backbone.patch_embed3.proj", "backbone.patch_embed4.proj")


class Measured:
    """One model measured under int8, with everything the tests look into."""

    def __init__(self, model, scheme: str = "int8"):
        self.model = model
        self.deployed = to_deploy(model, SIZE)
        self.layers = quantizable_layers(self.deployed)
        samples = procedural_validation_set(IMAGES, SIZE)
        self.held_out = HeldOut.from_samples(samples, model.config.data, SIZE, "test scenes")
        calibration = build_calibration_set("procedural", model.config.data, SIZE,
                                            CALIBRATION_IMAGES)
        self.ranges = calibrate_ranges(self.deployed,
                                       [torch.from_numpy(b) for b in calibration.batches])
        self.quantizer = FakeQuantizer(self.deployed, self.ranges)
        self.evaluator = StagedEvaluator(self.deployed, self.quantizer, self.held_out,
                                         model.config.num_classes)
        self.scheme = scheme
        self.result, self.baseline = measure_scheme(self.evaluator, self.layers, scheme, TOP)


@pytest.fixture(scope="module")
def measured(tiny_model):
    return Measured(tiny_model)


def _layer(measured, name):
    return next(layer for layer in measured.layers if layer.name == name)


# ----------------------------------------------------------------------------- fake quantization
# The kernels Core ML's converter folds a scale into (tests/test_coreml.py checks the same set
# on the converted program).
COREML_FOLDS = {
    *(f"backbone.patch_embed1.conv1.{i}" for i in (0, 3, 6)),
    *(f"decode_head.squeeze{i}.conv" for i in (1, 2)),
    *(f"{block}.mlp.fc2" for block in ("backbone.block3.0", "backbone.block4.0",
                                       "decode_head.fuse_block1", "decode_head.fuse_block2"))}


def test_int8_and_int4_weights_stay_within_half_a_step_of_the_stored_kernel(measured):
    factors = channel_factors(measured.deployed)
    assert set(factors) == COREML_FOLDS  # BatchNorms and layer scales
    residual = [n for n, m in measured.quantizer.modules.items()
                if isinstance(m, ResidualDepthwiseConv2d)]
    assert residual  # the folded identity is quantized too
    for name in ("backbone.patch_embed1.conv1.0", "decode_head.squeeze1.conv", residual[0],
                 "backbone.block4.0.mlp.fc2", "backbone.block1.0.attn.kv.0",
                 "decode_head.conv_seg"):
        module = measured.quantizer.modules[name]
        stored = stored_weight(module, factors.get(name))
        for precision, bits in (("int8", 8), ("weights-int4", 4)):
            quantized = measured.quantizer.stored_fake_weight(name, precision, "int8")
            scale = channel_scales(stored, bits).view(-1, *([1] * (stored.dim() - 1)))
            assert torch.all((quantized - stored).abs() <= scale / 2 * (1 + 1e-5)), name
            levels = torch.round(quantized / scale)
            assert levels.abs().max() <= 2 ** (bits - 1) - 1
            assert torch.allclose(levels * scale, quantized, atol=1e-6)
        # the parameter swapped in makes the module compute with exactly that kernel's value
        with measured.quantizer.applied({name: "int8"}, "int8"):
            assert torch.allclose(stored_weight(module, factors.get(name)),
                                  measured.quantizer.stored_fake_weight(name, "int8", "int8"),
                                  rtol=1e-5, atol=1e-6 * stored.abs().max())
        assert torch.equal(stored_weight(module, factors.get(name)), stored)  # restored


def test_weight_only_schemes_store_the_residual_kernel_without_its_identity(measured):
    name = next(n for n, m in measured.quantizer.modules.items()
                if isinstance(m, ResidualDepthwiseConv2d))
    module = measured.quantizer.modules[name]
    # int8 backends store the ONNX export's folded kernel; Core ML converts it unfolded
    assert torch.equal(measured.quantizer.stored_fake_weight(name, "int8", "int8"),
                       int_weight(module.folded_weight().detach(), 8))
    assert torch.equal(measured.quantizer.stored_fake_weight(name, "int8", "palette4"),
                       int_weight(module.weight.detach(), 8))
    assert torch.equal(measured.quantizer.fake_weight(name, "int8", "palette4"),
                       int_weight(module.weight.detach(), 8))


def test_palette_has_at_most_16_values_per_group_of_16_channels_of_the_folded_kernel(measured):
    from lrformer_edge.backends.coreml.compression import PALETTE_BITS
    from lrformer_edge.backends.coreml.compression import PALETTE_GROUP_SIZE as COREML_GROUP

    assert (PALETTE_GROUP_SIZE, PALETTE_ENTRIES) == (COREML_GROUP, 2 ** PALETTE_BITS)
    quantizer, factors = measured.quantizer, channel_factors(measured.deployed)
    compressed = measured_layers(measured.layers, "palette4")
    assert {"backbone.block4.0.mlp.fc2", "decode_head.squeeze1.conv"} <= {
        layer.name for layer in compressed}  # a layer scale and a BatchNorm folded in
    for layer in compressed:
        palette = quantizer.stored_fake_weight(layer.name, "palette4", "palette4")
        groups = palette.reshape(layer.out_channels // PALETTE_GROUP_SIZE, -1)
        assert max(group.unique().numel() for group in groups) <= PALETTE_ENTRIES, layer.name
        assert palette.unique().numel() > PALETTE_ENTRIES or len(groups) == 1, layer.name
        # the k-means of the kernel as stored, scale folded in; the parameter computes with it
        module = quantizer.modules[layer.name]
        folded = stored_weight(module, factors.get(layer.name), fold_identity=False)
        assert torch.equal(palette, palette_weight(folded))
        with quantizer.applied({layer.name: "palette4"}, "palette4"):
            assert torch.allclose(stored_weight(module, factors.get(layer.name)), palette,
                                  rtol=1e-5, atol=1e-6 * folded.abs().max())
    name = "backbone.patch_embed4.proj"  # the largest layer: k-means fits its distribution
    stored = stored_weight(quantizer.modules[name])
    error = (quantizer.stored_fake_weight(name, "palette4", "palette4") - stored).pow(2).mean()
    per_tensor = palette_weight(stored, group_size=stored.shape[0])  # one table for the tensor
    assert error < (per_tensor - stored).pow(2).mean()


def test_layers_core_ml_keeps_fp16_are_left_float_by_the_weight_only_simulation(measured):
    from lrformer_edge.backends.coreml.compression import stored_form

    quantizer = measured.quantizer
    for scheme in ("palette4", "weights-int4"):
        base = scheme_precisions(measured.layers, scheme)
        exporter = [layer.name for layer in measured.layers
                    if stored_form(layer, base[layer.name]) == "float16"]
        assert float_in_artifact(measured.layers, scheme) == exporter
        assert not set(exporter) & {layer.name for layer in measured_layers(measured.layers,
                                                                            scheme)}
    # conv_seg: 150 classes do not divide into palette groups; d_convs1.0: 9 x 16 weights
    for name in ("decode_head.conv_seg", "backbone.d_convs1.0"):
        assert name in float_in_artifact(measured.layers, "palette4")
        weight = quantizer.modules[name].weight
        original = weight.detach().clone()
        with torch.inference_mode(), quantizer.applied({name: "palette4"}, "palette4"):
            assert torch.equal(weight, original)
            logits = [measured.deployed(batch) for batch in measured.held_out.batches]
        assert all(torch.equal(a, measured.evaluator.fp32.logits(i))
                   for i, a in enumerate(logits))
        assert measured.evaluator.score({name: "palette4"}, "palette4").kl == 0
        with quantizer.applied({name: "int8"}, "int8"):  # the W8A8 backends quantize it
            assert not torch.equal(weight, original)
    with pytest.raises(ValueError, match="do not divide into palette groups of 16"):
        palette_weight(quantizer.modules["decode_head.conv_seg"].weight)


def test_activation_ranges_are_unsigned_after_a_relu_and_signed_on_the_image(measured):
    after_relu = measured.ranges["decode_head.fuse_block1.cpe"]  # squeeze1's ConvBNReLU output
    assert after_relu.unsigned and after_relu.low >= 0
    assert not measured.ranges["backbone.patch_embed1.conv1.0"].unsigned
    values = torch.linspace(-2, 3, 1001)
    unsigned = ActivationRange(0.0, 2.55).fake_quantize(values)
    assert unsigned.min() == 0 and unsigned.max() == pytest.approx(2.55)
    assert len(torch.unique(unsigned)) <= 256
    assert torch.allclose(unsigned / 0.01, torch.round(unsigned / 0.01), atol=1e-4)
    signed = ActivationRange(-1.27, 0.5).fake_quantize(values)
    assert signed.min() == pytest.approx(-1.28) and signed.max() == pytest.approx(1.27)


def test_weight_only_schemes_keep_depthwise_layers_at_int8(measured):
    for scheme in ("palette4", "weights-int4"):
        precisions = scheme_precisions(measured.layers, scheme)
        for layer in measured.layers:
            expected = KEPT_UNDER_WEIGHT_ONLY.get(layer.kind, scheme)
            assert precisions[layer.name] == expected
    assert set(scheme_precisions(measured.layers, "int8").values()) == {"int8"}


def test_kl_matches_float64_also_where_outputs_barely_differ():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(1, 12, 32, 32, generator=generator)
    p = torch.softmax(logits, dim=1)
    for scale in (1e-1, 1e-3, 1e-5):
        case = logits + scale * torch.randn(logits.shape, generator=generator)
        log_p = torch.log_softmax(logits.double(), 1)
        exact = float((log_p.exp() * (log_p - torch.log_softmax(case.double(), 1))).sum())
        assert kl_divergence_sum(p, logits - case) == pytest.approx(exact, rel=1e-3)
    assert kl_divergence_sum(p, torch.zeros_like(logits)) == 0


# ----------------------------------------------------------------------------- staged forward
@pytest.mark.parametrize("size", [SIZE, (64, 96)])
def test_the_steps_compose_to_exactly_the_deploy_forward(tiny_model, size):
    deployed = to_deploy(tiny_model, size)
    steps = deploy_steps(deployed)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(run_steps(steps, StepState(x)).x, deployed(x))
    shared = first_step_of(steps, "backbone.d_convs2.0")
    assert steps[shared].name == "backbone.block2.0"
    for layer in quantizable_layers(deployed):  # every layer belongs to a step
        first_step_of(steps, layer.name)


def test_a_staged_case_equals_the_same_case_computed_from_scratch(measured):
    evaluator, quantizer = measured.evaluator, measured.quantizer
    residual = next(n for n, m in quantizer.modules.items()
                    if isinstance(m, ResidualDepthwiseConv2d))
    base = measured.baseline.assignment
    cases = [({"backbone.d_convs3.0": "int8"}, None),
             ({residual: "int8"}, None),
             ({"decode_head.fuse_block2.mlp.fc1": "int8"}, None),
             ({**base, "backbone.block4.0.attn.proj": FLOAT}, measured.baseline),
             ({**base, "decode_head.conv_seg": FLOAT}, measured.baseline)]
    for assignment, baseline in cases:
        assert evaluator.first_difference(assignment, (baseline or evaluator.fp32).assignment) > 0
        staged = evaluator.case_logits(assignment, "int8", baseline)
        with torch.inference_mode(), quantizer.applied(assignment, "int8"):
            scratch = [measured.deployed(batch) for batch in measured.held_out.batches]
        assert all(torch.equal(a, b) for a, b in zip(staged, scratch)), assignment
    fp32 = [measured.deployed(b) for b in measured.held_out.batches]
    assert all(torch.equal(a, b.detach()) for a, b in zip(evaluator.case_logits({}, "int8"), fp32))


# ----------------------------------------------------------------------------- ranking
def test_scores_and_ranking_cover_every_layer(measured):
    result = measured.result
    assert result.ranking and sorted(result.ranking) == sorted(l.name for l in measured.layers)
    with_cases = [name for name in result.ranking if result.layers[name].all_but is not None]
    assert len(with_cases) == TOP and result.ranking[:TOP] == with_cases
    gains = [result.layers[name].gain(result.everything) for name in with_cases]
    assert gains == sorted(gains, reverse=True)
    rest = [result.layers[name].alone.kl for name in result.ranking[TOP:]]
    assert rest == sorted(rest, reverse=True)
    everything = result.everything
    assert 0 < everything.kl and everything.agreement < 1 and everything.sqnr_db > 0
    assert all(r.alone.kl >= 0 and 0 <= r.alone.agreement <= 1 for r in result.layers.values())


def test_a_layer_damaged_for_int8_is_ranked_first(tiny_model, measured):
    undamaged = measured.result.ranking
    victim = max(NORMALISED_CONVS, key=undamaged.index)  # the least sensitive of them
    assert undamaged[0] != victim
    model = copy.deepcopy(tiny_model)
    weight = dict(model.named_modules())[victim].weight
    with torch.no_grad():  # the same huge tap in every output channel: the LayerNorm removes it
        weight[:, 0, 1, 1] += 1000 * weight.abs().max()
    damaged = Measured(model)
    fp32 = damaged.evaluator.fp32
    assert fp32.score.miou == pytest.approx(measured.evaluator.fp32.score.miou, abs=1e-6)
    assert all(torch.allclose(fp32.logits(i), measured.evaluator.fp32.logits(i), atol=1e-2)
               for i in range(IMAGES))
    assert damaged.result.ranking[0] == victim
    alone = damaged.result.layers[victim].alone
    assert alone.agreement < min(r.alone.agreement for n, r in damaged.result.layers.items()
                                 if n != victim)


# ----------------------------------------------------------------------------- selection
def test_the_agreement_selection_meets_its_bound_and_one_layer_less_does_not(measured):
    everything = measured.result.everything
    target = 100 * (everything.agreement + (1 - everything.agreement) / 2)
    bound = Bound("min-agreement", target)
    size_model = SizeModel.of(measured.deployed, measured.layers, "int8")
    baseline = measured.evaluator.baseline(measured.baseline.assignment, "int8")
    selection = select(measured.evaluator, measured.result, baseline, bound, size_model)
    assert selection.met and 0 < selection.k < len(measured.result.ranking)
    assert selection.raised == measured.result.ranking[:selection.k]
    trace = {entry["k"]: entry["agreement"] for entry in selection.trace}
    assert 100 * trace[selection.k] >= target > 100 * trace[selection.k - 1]
    # measured again from scratch: the prediction holds
    assignment = raised_assignment(measured.baseline.assignment, selection.raised, FLOAT)
    with torch.inference_mode(), measured.quantizer.applied(assignment, "int8"):
        logits = [measured.deployed(b) for b in measured.held_out.batches]
    same = sum(int((x.argmax(1) == measured.evaluator.fp32.logits(i).argmax(1)).sum())
               for i, x in enumerate(logits))
    assert same / (IMAGES * SIZE[0] * SIZE[1]) == pytest.approx(selection.score.agreement)


def test_a_float_compute_budget_skips_the_ranked_layers_that_exceed_it(measured):
    everything = measured.result.everything
    bound = Bound("min-agreement", 100 * (everything.agreement + (1 - everything.agreement) / 2))
    size_model = SizeModel.of(measured.deployed, measured.layers, "int8")
    baseline = measured.evaluator.baseline(measured.baseline.assignment, "int8")
    macs = layer_macs(measured.deployed, SIZE)
    free = select(measured.evaluator, measured.result, baseline, bound, size_model, macs)
    budget = sum(macs[name] for name in free.raised) / 2e9
    limited = select(measured.evaluator, measured.result, baseline, bound, size_model, macs,
                     budget)
    allowed = within_compute_budget(measured.result.ranking, macs, budget)
    assert limited.raised == allowed[:limited.k]
    assert limited.float_gmacs <= budget < free.float_gmacs
    assert limited.as_dict()["float_gmacs_budget"] == budget


def test_layer_macs_count_every_call_of_a_shared_layer(tiny_model):
    deployed = to_deploy(tiny_model, SIZE)
    macs = layer_macs(deployed, SIZE)
    assert set(macs) == {layer.name for layer in quantizable_layers(deployed)}
    classifier = deployed.decode_head.conv_seg
    height, width = SIZE[0] // 8, SIZE[1] // 8  # the head works at 1/8 scale
    assert macs["decode_head.conv_seg"] == (classifier.out_channels * height * width
                                            * classifier.in_channels)
    blocks = len(deployed.backbone.block1)
    shared = deployed.backbone.d_convs1[0]
    calls = macs["backbone.d_convs1.0"] / (shared.weight[0].numel())
    assert calls % blocks == 0 and calls > 0  # the same pooled map size in every block


def test_bounds_are_checked():
    with pytest.raises(ValueError, match="percentage"):
        Bound("min-agreement", 101)
    with pytest.raises(ValueError, match="finite number >= 0"):
        Bound("max-drop", -1)
    assert Bound("max-size-mib", 5).applies_to("palette4")
    assert not Bound("max-size-mib", 5).applies_to("int8")


def test_the_size_model_is_the_core_ml_exporters_rule_plus_the_other_parameters(measured):
    from lrformer_edge.backends.coreml.compression import compressed_weight_bytes

    size_model = SizeModel.of(measured.deployed, measured.layers, "palette4")
    assert size_model.artifact == "Core ML package"  # found through the registry
    total = sum(p.numel() for p in measured.deployed.parameters())
    other = 2 * (total - sum(layer.weight_elements for layer in measured.layers))
    assert size_model.bytes({}) == 2 * total  # everything fp16
    mixed = {**scheme_precisions(measured.layers, "palette4"),
             "backbone.patch_embed4.proj": "int8", "decode_head.squeeze1.conv": "int8",
             "backbone.block4.0.attn.kv.0": "weights-int4", "backbone.block4.0.mlp.fc2": FLOAT,
             "decode_head.conv_seg": "int8"}
    assert size_model.bytes(mixed) == other + compressed_weight_bytes(measured.layers, mixed.get)
    sizes = [size_model.bytes(scheme_precisions(measured.layers, s))
             for s in ("palette4", "weights-int4", "int8")]
    assert sizes[0] < sizes[2] < size_model.bytes({}) and sizes[1] < sizes[2]
    layer = _layer(measured, "backbone.patch_embed4.proj")  # one table per 16 channels
    assert size_model.layer_bytes(layer, "int8") - size_model.layer_bytes(layer, "palette4") \
        == layer.weight_elements / 2


# ----------------------------------------------------------------------------- the command
def _script():
    spec = importlib.util.spec_from_file_location("sensitivity_cli",
                                                  REPO / "calibration" / "sensitivity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exit_code(arguments) -> int:
    try:
        return _script().main(arguments)
    except SystemExit as stopped:  # argparse
        return stopped.code


COMMON = ["--variant", "lrformer-test", "--input-size", "64", "64", "--images", "1",
          "--calib-images", "2", "--top", "2"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One run of the command: int8 and palette4, with a size budget for palette4."""
    output = tmp_path_factory.mktemp("sensitivity") / "out"
    import lrformer_edge

    model = lrformer_edge.create_model("lrformer-test")
    layers = quantizable_layers(model)
    size_model = SizeModel.of(model, layers, "palette4")
    low = size_model.scheme_mib()
    high = size_model.mib(scheme_precisions(layers, "int8"))
    budget = round((low + high) / 2, 4)
    code = _script().main([*COMMON, "--scheme", "int8", "palette4", "--max-size-mib",
                           str(budget), "--output", str(output)])
    return code, output, budget, model


def test_the_command_writes_reports_and_the_config_of_its_bound(cli_run, capsys):
    code, output, budget, model = cli_run
    assert code == 0
    assert sorted(p.name for p in output.iterdir()) == sorted(
        ["sensitivity.json", "sensitivity.md", "sensitivity.html",
         config_path(output, "palette4").name])  # --max-size-mib applies to palette4 only
    report = json.loads((output / "sensitivity.json").read_text())
    assert report["settings"]["schemes"] == ["int8", "palette4"]
    assert report["cpu"] and report["timing"]["total_s"] > 0
    palette = report["schemes"]["palette4"]
    measured = measured_layers(quantizable_layers(model), "palette4")
    assert len(palette["layers"]) == len(measured)
    assert set(palette["kept"].values()) == {"int8"}
    assert palette["stays_float"] == float_in_artifact(quantizable_layers(model), "palette4")
    assert palette["stays_float_in"] == "Core ML package"
    assert report["size_model"]["schemes"]["palette4"]["scheme_mib"] == pytest.approx(
        SizeModel.of(model, quantizable_layers(model), "palette4").scheme_mib())
    selection = palette["selection"]
    assert selection["met"] and selection["size_mib"] <= budget and selection["k"] > 0
    config = PrecisionConfig.load(config_path(output, "palette4"))
    config.check_fits(model, SIZE)
    assert config.scheme == "palette4" and config.input_size == SIZE
    assert config.selection["criterion"] == "max-size-mib" and config.selection["bound"] == budget
    assert config.selection["k"] == selection["k"] and config.selection["images"] == 1
    assert set(palette["kept"]) <= set(config.overrides)
    assert sum(p == "int8" for p in config.overrides.values()) == len(palette["kept"]) + \
        selection["k"]
    # greedy fill: no layer left at 4 bits fits in what the budget has left
    size_model = SizeModel.of(model, quantizable_layers(model), "palette4")
    assignment = {layer.name: config.precision_of(layer.name)
                  for layer in quantizable_layers(model)}
    left = budget * 2 ** 20 - size_model.bytes(assignment)
    assert size_model.mib(assignment) == pytest.approx(selection["size_mib"])
    for layer in measured:
        if assignment[layer.name] == "palette4":
            assert size_model.layer_bytes(layer, "int8") - \
                size_model.layer_bytes(layer, "palette4") > left


def test_the_reports_hold_the_ranked_tables_and_plots(cli_run):
    _, output, _, _ = cli_run
    report = json.loads((output / "sensitivity.json").read_text())
    markdown = (output / "sensitivity.md").read_text()
    page = (output / "sensitivity.html").read_text()
    for scheme in ("int8", "palette4"):
        first = report["schemes"][scheme]["ranking"][0]
        assert f"### {scheme}" in markdown and f"| 1 | {first} |" in markdown
        assert f"id='ranking-{scheme}'" in page and first in page
    assert "| rank | layer | kind | params | KL | SQNR dB | agreement % |" in markdown
    stays = report["schemes"]["palette4"]["stays_float"]
    assert f"{len(stays)} layer(s) stay fp16 in the Core ML package" in markdown
    assert "decode_head.conv_seg" in stays and not report["schemes"]["int8"]["stays_float"]
    assert page.count("<svg") == 2 and "No front was measured" in page
    assert "http" not in page and "src=" not in page  # nothing loaded from anywhere


def test_fronts_are_plotted_per_backend(tmp_path):
    points = [{"backend": "openvino", "k": k, "latency_ms": 80 + k, "agreement": 0.99 + k / 1e3,
               "miou": 0.7 + k / 1e4} for k in (0, 1, 2, 4)]
    points += [{"backend": "coreml", "k": k, "size_mib": 7 + k / 4, "agreement": 0.98 + k / 1e3,
                "miou": 0.69} for k in (0, 2, 8)]
    svg = render_front(points)
    assert svg.count("<svg") == 4 and "k=4" in svg and "size (MiB)" in svg
    assert "latency (ms)" in svg
    failed = {"backend": "tensorrt", "scheme": "int8", "k": 1, "median_ms": None,
              "agreement": None, "miou": None}
    shown = render_front(points + [failed, {**failed, "k": 0, "median_ms": 9.0,
                                            "agreement": 0.99, "miou": 0.7}])
    assert "<h3>tensorrt (int8)</h3><p>1 point(s) not measured.</p>" in shown
    assert shown.count("<svg") == 6
    with pytest.raises(ValueError, match="latency_ms, median_ms, size_mib"):
        render_front([{"backend": "x", "k": 0, "agreement": 1, "miou": 1}])
    run = _cheap_run(Bound("min-agreement", 100))
    selection = run.schemes["weights-int4"].selection
    written, unmet = write_sensitivity(run, tmp_path / "r", fronts=points)
    page = written["sensitivity.html"].read_text()
    assert "<h3>openvino</h3>" in page and "<h3>coreml</h3>" in page
    assert json.loads(written["sensitivity.json"].read_text())["fronts"] == points
    # a bound that was not met gets no config (whichever way this one went)
    assert config_path(tmp_path / "r", "weights-int4").is_file() == selection.met
    assert unmet == ([] if selection.met else ["weights-int4"])


def test_an_unmet_bound_under_a_compute_budget_still_writes_the_budget_config(tmp_path):
    """Every ranked layer that fits the budget is raised; the config says the bound was not met
    in the simulation, so a backend's recipe can still be validated against it."""
    import lrformer_edge
    from lrformer_edge.models.layers import layer_macs

    model = lrformer_edge.create_model("lrformer-test")
    budget = 0.002  # GMACs per image: a few of the tiny model's layers
    run = run_sensitivity(model, SIZE, ("int8",), images=1, calibration_images=CALIBRATION_IMAGES,
                          top=TOP, bound=Bound("min-agreement", 100), max_float_gmacs=budget,
                          log=lambda *_: None)
    selection = run.schemes["int8"].selection
    assert not selection.met and selection.raised
    macs = layer_macs(to_deploy(model, SIZE), SIZE)
    assert sum(macs[name] for name in selection.raised) <= budget * 1e9
    ranking = run.schemes["int8"].ranking
    assert selection.raised == within_compute_budget(ranking, macs, budget) != ranking
    written, unmet = write_sensitivity(run, tmp_path / "r")
    assert unmet == ["int8"]
    config = PrecisionConfig.load(config_path(tmp_path / "r", "int8"))
    assert set(config.float_layers) == set(selection.raised)
    assert config.selection["bound_met"] is False and config.selection["max_float_gmacs"] == budget


def _cheap_run(bound=None):
    import lrformer_edge

    model = lrformer_edge.create_model("lrformer-test")
    return run_sensitivity(model, SIZE, ("weights-int4",), images=1,
                           calibration_images=CALIBRATION_IMAGES,
                           top=1, bound=bound, log=lambda *_: None)


def test_top_k_configs_from_a_report_fit_the_model(cli_run):
    _, output, _, model = cli_run
    rankings = Rankings.load(output / "sensitivity.json")
    config = top_k_config(rankings, "palette4", 3)
    config.check_fits(model, SIZE)
    raised = [name for name in rankings.orders["palette4"][:3]]
    assert all(config.precision_of(name) == "int8" for name in raised)
    assert top_k_config(rankings, "int8", 0).overrides == {}
    assert top_k_config(rankings, "int8", 2).float_layers == tuple(
        sorted(rankings.orders["int8"][:2]))
    with pytest.raises(ValueError, match="k must lie in"):
        top_k_config(rankings, "int8", len(rankings.orders["int8"]) + 1)
    with pytest.raises(ValueError, match="not a sensitivity.json"):
        Rankings.load(output / "sensitivity.md")


@needs_chromium
def test_the_sensitivity_page_renders_in_a_real_browser(cli_run, tmp_path):
    _, output, _, _ = cli_run
    page = output / "sensitivity.html"
    dom = rendered_dom(page)
    assert 'data-ready="ok"' in dom and 'data-plots="2"' in dom
    assert "id=\"ranking-int8\"" in dom
    assert_renders_content(page, tmp_path)


@pytest.mark.parametrize("arguments, message", [
    (["--scheme", "int9"], "invalid choice: 'int9'"),
    (["--images", "-1"], "--images must be positive"),
    (["--calib-images", "0"], "--calib-images must be positive"),
    (["--top", "-2"], "--top must be 0 or more"),
    (["--scheme", "int8", "--max-size-mib", "5"], "add one with --scheme"),
    (["--max-drop", "-1"], "--max-drop must be a finite number >= 0"),
    (["--max-drop", "1", "--min-agreement", "99"], "not allowed with argument"),
    (["--scheme", "palette4", "--max-size-mib", "0.001"], "below the smallest palette4 model"),
    (["--data", "no-such-dataset"], "no-such-dataset does not exist"),
    (["--max-float-gmacs", "1"], "--max-float-gmacs limits the int8 selection"),
    (["--min-agreement", "99", "--max-float-gmacs", "-1"], "--max-float-gmacs must be 0 or more"),
])
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(tmp_path, capsys, arguments,
                                                               message):
    output = tmp_path / "out"
    assert _exit_code([*COMMON, "--output", str(output), *arguments]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert not output.exists()


def test_an_output_that_is_a_file_is_refused(tmp_path, capsys):
    existing = tmp_path / "report.txt"
    existing.write_text("keep me")
    assert _exit_code([*COMMON, "--output", str(existing)]) == 2
    assert existing.read_text() == "keep me"
    assert "error: " in capsys.readouterr().err
