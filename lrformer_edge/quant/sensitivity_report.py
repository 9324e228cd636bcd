"""Reports of a sensitivity run: ``sensitivity.json`` (everything measured), ``sensitivity.md``
(a ranked table per scheme) and ``sensitivity.html`` (one self-contained page: the tables, an
inline-SVG bar plot of every layer's sensitivity per scheme and, when given, the speed/accuracy
fronts of the backends; no script or style is loaded from anywhere)."""
from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from lrformer_edge.files import atomic_write
from lrformer_edge.quant.fake_quant import (
    KEPT_UNDER_WEIGHT_ONLY,
    PALETTE_GROUP_SIZE,
    RAISED_PRECISION,
)
from lrformer_edge.quant.selection import MIB, SIZE_MODEL, selection_config
from lrformer_edge.quant.sensitivity import SchemeResult, SensitivityRun

FORMAT = "lrformer-edge sensitivity"
VERSION = 1
REPORT_NAMES = ("sensitivity.json", "sensitivity.md", "sensitivity.html")
KIND_COLOURS = {"conv": "#4e79a7", "depthwise": "#59a14f", "linear": "#f28e2b"}
SERIES_COLOURS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1"]
# A front point's cost, in order of preference: latency where it was measured, else size.
FRONT_COSTS = (("latency_ms", "latency (ms)"), ("median_ms", "median latency (ms)"),
               ("size_mib", "size (MiB)"))
# The bar plot's log axis spans at most this many decades below the most sensitive layer:
# layers behind a 1e-6 layer scale have KLs of 1e-19 that would squeeze the rest.
BAR_DECADES = 6


# ----------------------------------------------------------------------------- JSON
def to_json(run: SensitivityRun, fronts: Sequence[Mapping] | None = None) -> dict:
    return _finite({
        "format": FORMAT, "version": VERSION,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "variant": run.variant, "checkpoint_sha256": run.checkpoint_sha256,
        "input_size": list(run.input_size), "cpu": run.cpu, "settings": run.settings,
        "held_out": run.held_out, "calibration": run.calibration, "fp32_miou": run.fp32_miou,
        "timing": {**run.timing, "steps_run": run.steps_run},
        "step_seconds_fp32": run.step_seconds,
        "rules": {"kept_under_weight_only": KEPT_UNDER_WEIGHT_ONLY,
                  "raised_precision": RAISED_PRECISION,
                  "palette_group_size": PALETTE_GROUP_SIZE},
        "size_model": {"description": SIZE_MODEL, "schemes": {
            scheme: {"artifact": model.artifact, "other_parameters": model.other_parameters,
                     "other_mib": model.other_bytes() / MIB, "float16_mib": model.mib({}),
                     "scheme_mib": model.scheme_mib()}
            for scheme, model in run.size_models.items()}},
        "schemes": {scheme: _scheme_json(result) for scheme, result in run.schemes.items()},
        "rankings": run.rankings.to_dict(),
        "fronts": list(fronts) if fronts else None,
    })


def _scheme_json(result: SchemeResult) -> dict:
    return {"everything": result.everything.as_dict(), "seconds": result.seconds,
            "kept": result.kept, "stays_float": result.stays_float,
            "stays_float_in": result.artifact, "ranking": result.ranking,
            "layers": [_layer_json(result, rank, name)
                       for rank, name in enumerate(result.ranking, start=1)],
            "selection": result.selection.as_dict() if result.selection else None}


def _layer_json(result: SchemeResult, rank: int, name: str) -> dict:
    measured = result.layers[name]
    gain = measured.gain(result.everything)
    return {"rank": rank, "name": name, "kind": measured.layer.kind,
            "params": measured.layer.weight_elements, "alone": measured.alone.as_dict(),
            "all_but": measured.all_but.as_dict() if measured.all_but else None,
            "gain": None if gain is None else {"agreement": gain[0], "kl_reduction": gain[1]},
            "sensitivity": measured.sensitivity(result.everything)}


def _finite(value):
    """NaN and infinities as null: strict JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


# ----------------------------------------------------------------------------- tables
TABLE_HEADERS = ("rank", "layer", "kind", "params", "KL", "SQNR dB", "agreement %",
                 "ΔmIoU pts", "raised alone: agreement pts, KL change")


def table_rows(result: SchemeResult) -> list[tuple[str, ...]]:
    rows = []
    for rank, name in enumerate(result.ranking, start=1):
        measured = result.layers[name]
        alone, gain = measured.alone, measured.gain(result.everything)
        rows.append((
            str(rank), name, measured.layer.kind, f"{measured.layer.weight_elements:,}",
            f"{alone.kl:.3g}", "-" if alone.sqnr_db is None else f"{alone.sqnr_db:.1f}",
            f"{100 * alone.agreement:.3f}", f"{alone.miou_delta_points:+.2f}",
            "-" if gain is None else f"{100 * gain[0]:+.3f}, {-gain[1]:+.2g}"))
    return rows


def describe_everything(result: SchemeResult) -> str:
    score = result.everything
    sqnr = "-" if score.sqnr_db is None else f"{score.sqnr_db:.1f} dB"
    return (f"everything quantized: agreement {100 * score.agreement:.3f}%, mIoU "
            f"{score.miou_delta_points:+.2f} points, KL {score.kl:.3g}, SQNR {sqnr}")


def describe_kept(result: SchemeResult) -> str | None:
    if not result.kept:
        return None
    precisions = sorted(set(result.kept.values()))
    stored_float = len(set(result.kept) & set(result.stays_float))
    return (f"{len(result.kept)} layer(s) keep {'/'.join(precisions)} by rule "
            f"({', '.join(KEPT_UNDER_WEIGHT_ONLY)} under weight-only schemes), not measured"
            + (f" ({stored_float} of them stay fp16, see below)" if stored_float else ""))


def describe_stays_float(result: SchemeResult) -> str | None:
    if not result.stays_float:
        return None
    shown = ", ".join(result.stays_float[:6]) + (" ..." if len(result.stays_float) > 6 else "")
    return (f"{len(result.stays_float)} layer(s) stay fp16 in the {result.artifact} whatever "
            f"their precision (too small to compress, or a palette whose output channels do not "
            f"divide into groups of {PALETTE_GROUP_SIZE}): not compressed in the simulation, "
            f"not measured: {shown}")


def describe_selection(result: SchemeResult) -> str | None:
    selection = result.selection
    if selection is None:
        return None
    verdict = "met" if selection.met else "NOT met even with every ranked layer raised"
    return (f"selection {selection.bound.describe()}: {selection.k} layer(s) raised to "
            f"{selection.precision}, measured agreement {100 * selection.score.agreement:.3f}%, "
            f"mIoU {selection.score.miou_delta_points:+.2f} points, modelled size "
            f"{selection.size_mib:.2f} MiB (see the size model)"
            + (f", {selection.float_gmacs:.2f} GMACs in float"
               + (f" (budget {selection.float_gmacs_budget:g})"
                  if selection.float_gmacs_budget is not None else "")
               if selection.float_gmacs is not None else "")
            + f"; bound {verdict}")


def title(run: SensitivityRun) -> str:
    images = run.held_out["images"]
    return (f"Quantization sensitivity: {run.variant} at {run.input_size[0]}x"
            f"{run.input_size[1]}, {images} held-out image{'s' if images != 1 else ''}")


def settings_line(run: SensitivityRun) -> str:
    return (f"Held-out: {run.held_out['description']}. Calibration: "
            f"{run.calibration['images']} images from {run.calibration['source']}. FP32 mIoU "
            f"{100 * run.fp32_miou:.2f}. Top {run.settings['top']} layers of each scheme get an "
            f"all-but-one case. Run time {run.timing['total_s']:.0f} s on {run.cpu}.")


def to_markdown(run: SensitivityRun, rows_per_scheme: int | None = None) -> str:
    """The Markdown report (``rows_per_scheme``: only the head of each table)."""
    lines = [f"## {title(run)}", "", settings_line(run), "",
             "Ranking: layers with an all-but-one case first, by the pixel agreement (then KL) "
             "that raising them alone gains over everything quantized; the others by their KL "
             "when quantized alone. KL: mean per pixel, FP32 || quantized, nats.", "",
             f"Size model: {SIZE_MODEL}.", ""]
    for scheme, result in run.schemes.items():
        lines += [f"### {scheme}", "", describe_everything(result) + ".", ""]
        for note in (describe_kept(result), describe_stays_float(result),
                     describe_selection(result)):
            if note:
                lines += [note + ".", ""]
        lines += ["| " + " | ".join(TABLE_HEADERS) + " |", "|" + "---|" * len(TABLE_HEADERS)]
        rows = table_rows(result)[:rows_per_scheme]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def sensitivity_bars(result: SchemeResult) -> str:
    """Horizontal bars, one per ranked layer: its KL when quantized alone (log scale), coloured
    by kind; layers with an all-but-one case carry their agreement gain."""
    rows = [result.layers[name] for name in result.ranking]
    values = [r.alone.kl for r in rows]
    positive = [v for v in values if v > 0]
    if not positive:
        return "<p>No layer changed the output when quantized alone.</p>"
    high = math.log10(max(positive))
    low = min(max(math.log10(min(positive)), high - BAR_DECADES), high - 1)
    row, left, plot = 14, 300, 420
    parts = [f"<svg width='{left + plot + 190}' height='{row * len(rows) + 30}' role='img' "
             f"aria-label='{html.escape(result.scheme)} per-layer sensitivity'>"]
    for decade in range(math.ceil(low), math.floor(high) + 1):
        x = left + plot * (decade - low) / (high - low)
        parts.append(f"<line x1='{x:.1f}' x2='{x:.1f}' y1='0' y2='{row * len(rows)}' "
                     f"stroke='#e3e3e3'/><text x='{x:.1f}' y='{row * len(rows) + 14}' "
                     f"font-size='10' text-anchor='middle'>1e{decade}</text>")
    for index, (measured, value) in enumerate(zip(rows, values)):
        y = index * row
        width = plot * max(0.0, math.log10(value) - low) / (high - low) if value > 0 else 0
        gain = measured.gain(result.everything)
        note = "" if gain is None else f"raised: {100 * gain[0]:+.3f} pts"
        name = html.escape(measured.layer.name)
        parts.append(
            f"<text x='{left - 4}' y='{y + 10}' text-anchor='end' font-size='10'>{name}</text>"
            f"<rect x='{left}' y='{y + 2}' width='{max(width, 0.5):.1f}' height='{row - 4}' "
            f"fill='{KIND_COLOURS.get(measured.layer.kind, '#999')}'><title>{name}: KL "
            f"{value:.3g}</title></rect>"
            f"<text x='{left + width + 4:.1f}' y='{y + 10}' font-size='10'>{value:.2g} "
            f"{html.escape(note)}</text>")
    parts.append("</svg>")
    legend = "".join(f"<span class='key'><i style='background:{colour}'></i>{kind}</span>"
                     for kind, colour in KIND_COLOURS.items())
    return (f"<div class='legend'>{legend} (x: KL when quantized alone, log scale)</div>"
            + "".join(parts))


def render_front(points: Sequence[Mapping]) -> str:
    """One SVG line plot per backend (and scheme) of its speed/accuracy front.

    ``points``: dicts with ``backend``, ``k`` (layers kept in higher precision), a cost
    (``latency_ms`` or ``median_ms``; ``size_mib`` where latency cannot be measured, e.g. Core
    ML off macOS), ``agreement`` and ``miou`` as fractions in [0, 1], and optionally ``scheme``.
    Each series gets agreement (%) and mIoU (%) against its cost (latency where every point has
    one, else size), points joined in order of k and labelled with it; points that were not
    measured (a None, e.g. a failed export) are left out and counted."""
    series: dict[tuple[str, str], list[Mapping]] = {}
    for point in points:
        missing = [key for key in ("backend", "k", "agreement", "miou") if key not in point]
        if missing or not any(cost in point for cost, _ in FRONT_COSTS):
            raise ValueError(f"a front point needs backend, k, agreement, miou and one of "
                             f"{', '.join(c for c, _ in FRONT_COSTS)}; got {dict(point)}")
        series.setdefault((str(point["backend"]), str(point.get("scheme") or "")),
                          []).append(point)
    blocks = []
    for (backend, scheme), group in series.items():
        name = f"{backend} ({scheme})" if scheme else backend
        measured = [p for p in group if p["agreement"] is not None and p["miou"] is not None]
        cost = next(((c, a) for c, a in FRONT_COSTS
                     if measured and all(p.get(c) is not None for p in measured)), None)
        left_out = len(group) - (len(measured) if cost else 0)
        note = f"<p>{left_out} point(s) not measured.</p>" if left_out else ""
        if cost is None:
            blocks.append(f"<h3>{html.escape(name)}</h3>{note}")
            continue
        measured.sort(key=lambda p: p["k"])
        plots = "".join(_front_plot(name, measured, *cost, metric, label)
                        for metric, label in (("agreement", "agreement (%)"),
                                              ("miou", "mIoU (%)")))
        blocks.append(f"<h3>{html.escape(name)}</h3>{note}<div class='fronts'>{plots}</div>")
    return "".join(blocks)


def _front_plot(backend: str, series: list[Mapping], cost: str, axis: str, metric: str,
                label: str) -> str:
    width, height, left, bottom, top, right = 380, 240, 56, 36, 12, 16
    xs = [float(p[cost]) for p in series]
    ys = [100 * float(p[metric]) for p in series]
    x_low, x_high = _padded(min(xs), max(xs))
    y_low, y_high = _padded(min(ys), max(ys))

    def at(x, y):
        return (left + (width - left - right) * (x - x_low) / (x_high - x_low),
                top + (height - top - bottom) * (1 - (y - y_low) / (y_high - y_low)))

    colour = SERIES_COLOURS[0 if metric == "agreement" else 1]
    parts = [f"<svg width='{width}' height='{height}' role='img' "
             f"aria-label='{html.escape(backend)} {html.escape(label)} against {axis}'>",
             f"<rect x='{left}' y='{top}' width='{width - left - right}' "
             f"height='{height - top - bottom}' fill='none' stroke='#bbb'/>"]
    for value, anchor in ((x_low, "start"), (x_high, "end")):
        x, _ = at(value, y_low)
        parts.append(f"<text x='{x:.1f}' y='{height - bottom + 14}' font-size='10' "
                     f"text-anchor='{anchor}'>{value:.4g}</text>")
    for value in (y_low, y_high):
        _, y = at(x_low, value)
        parts.append(f"<text x='{left - 4}' y='{y + 4:.1f}' font-size='10' "
                     f"text-anchor='end'>{value:.3f}</text>")
    parts.append(f"<text x='{(width + left) / 2}' y='{height - 4}' font-size='11' "
                 f"text-anchor='middle'>{html.escape(axis)}</text>"
                 f"<text x='12' y='{(height - bottom) / 2}' font-size='11' text-anchor='middle' "
                 f"transform='rotate(-90 12 {(height - bottom) / 2})'>{html.escape(label)}</text>")
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (at(a, b) for a, b in zip(xs, ys)))
    parts.append(f"<polyline points='{path}' fill='none' stroke='{colour}' stroke-width='1.5'/>")
    for point, x_value, y_value in zip(series, xs, ys):
        x, y = at(x_value, y_value)
        parts.append(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3.5' fill='{colour}'><title>k="
                     f"{point['k']}: {y_value:.3f}, {x_value:.4g}</title></circle>"
                     f"<text x='{x + 5:.1f}' y='{y - 5:.1f}' font-size='10'>k={point['k']}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _padded(low: float, high: float) -> tuple[float, float]:
    span = high - low
    pad = span * 0.08 if span > 0 else max(abs(high) * 0.01, 1e-6)
    return low - pad, high + pad


# ----------------------------------------------------------------------------- HTML
STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ccc;padding:3px 6px}
th{background:#f3f3f3}td{text-align:right}td:nth-child(2),td:nth-child(3){text-align:left}
.legend{margin:6px 0;font-size:12px}.key{margin-right:14px}
.key i{display:inline-block;width:10px;height:10px;margin-right:4px}
.fronts{display:flex;flex-wrap:wrap;gap:16px}
details{margin:8px 0}
"""

# Marks the page as rendered once loaded, with the number of plots; a browser test reads it.
READY_SCRIPT = """
window.addEventListener('load', function () {
  document.body.setAttribute('data-plots', String(document.querySelectorAll('svg').length));
  document.body.setAttribute('data-ready', 'ok');
});
"""


def _html_table(result: SchemeResult) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in TABLE_HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                   for row in table_rows(result))
    return (f"<table class='ranking' id='ranking-{html.escape(result.scheme)}'><thead><tr>"
            f"{head}</tr></thead><tbody>{body}</tbody></table>")


def _scheme_section(result: SchemeResult) -> str:
    notes = [describe_everything(result), describe_kept(result), describe_stays_float(result),
             describe_selection(result)]
    paragraphs = "".join(f"<p>{html.escape(note)}.</p>" for note in notes if note)
    return (f"<h2 id='scheme-{html.escape(result.scheme)}'>{html.escape(result.scheme)}</h2>"
            f"{paragraphs}<h3>Per-layer sensitivity</h3>{sensitivity_bars(result)}"
            f"<details open><summary>Ranked table</summary>{_html_table(result)}</details>")


def to_html(run: SensitivityRun, fronts: Sequence[Mapping] | None = None) -> str:
    front = (render_front(fronts) if fronts else
             "<p>No front was measured in this run (the front runs each backend's export of "
             "the top k layers; see quant/front.py).</p>")
    sections = "".join(_scheme_section(result) for result in run.schemes.values())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title(run))}</title>
<style>{STYLE}</style></head>
<body data-ready="pending">
<h1>{html.escape(title(run))}</h1>
<p id="settings">{html.escape(settings_line(run))}</p>
<p>Ranking: layers with an all-but-one case first, by the pixel agreement (then KL) that raising
them alone gains over everything quantized; the others by their KL when quantized alone.
Size model: {html.escape(SIZE_MODEL)}.</p>
{sections}
<h2 id="fronts">Fronts: speed and accuracy per backend</h2>{front}
<script>{READY_SCRIPT}</script>
</body></html>
"""


def write_reports(run: SensitivityRun, folder: str | Path,
                  fronts: Sequence[Mapping] | None = None) -> dict[str, Path]:
    """``sensitivity.{json,md,html}`` in ``folder`` (each written whole or not at all)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    documents = dict(zip(REPORT_NAMES, (
        json.dumps(to_json(run, fronts), indent=2, allow_nan=False) + "\n",
        to_markdown(run), to_html(run, fronts))))
    return {name: atomic_write(folder / name,
                               lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
            for name, text in documents.items()}


def config_path(folder: str | Path, scheme: str) -> Path:
    return Path(folder) / f"precision-config-{scheme}.json"


def write_sensitivity(run: SensitivityRun, folder: str | Path,
                      fronts: Sequence[Mapping] | None = None) -> tuple[dict[str, Path], list[str]]:
    """The reports, and the precision config of every selection that met its bound, into
    ``folder``: ({file name: path}, schemes whose selection did not meet the bound). Under a
    float-compute budget an unmet selection's config is written too: it is every ranked layer
    the budget allows, the most accuracy that latency buys, and a backend's own recipe can beat
    the simulation (OpenVINO's SmoothQuant), so it is worth validating; it records
    ``bound_met: false``."""
    folder = Path(folder)
    written = write_reports(run, folder, fronts)
    unmet = []
    for scheme, result in run.schemes.items():
        if result.selection is None:
            continue
        if not result.selection.met:
            unmet.append(scheme)
            if result.selection.float_gmacs_budget is None:
                continue
        config = selection_config(run.rankings, result.selection, run.held_out["images"],
                                  str(written["sensitivity.json"]))
        path = config.save(config_path(folder, scheme))
        written[path.name] = path
    return written, unmet


def front_html(points: Sequence[Mapping], title_text: str) -> str:
    """A page of its own for fronts measured after the sensitivity run
    (``calibration/front.py``): the same plots as the report's front section, and a table."""
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(value))}</td>" for value in (
            p["backend"], p.get("scheme", ""), p["k"], p.get("status", "ok"),
            _fmt(p.get("median_ms"), ".1f"), _fmt(p.get("size_mib"), ".2f"),
            _fmt(p.get("agreement"), ".4%"), _fmt(p.get("miou"), ".2%"),
            _fmt(p.get("miou_delta_points"), "+.2f"), p.get("measured_by", ""),
            p.get("reason", ""))) + "</tr>" for p in points)
    head = "".join(f"<th>{h}</th>" for h in (
        "backend", "scheme", "k", "status", "median ms", "MiB", "agreement", "mIoU",
        "mIoU delta", "measured by", "note"))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
            f"{html.escape(title_text)}</title><style>{STYLE}</style>"
            f"<script>{READY_SCRIPT}</script></head><body><h1>{html.escape(title_text)}</h1>"
            f"{render_front(points)}<table><tr>{head}</tr>{rows}</table></body></html>\n")


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)
