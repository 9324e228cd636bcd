"""Validation reports: JSON (machine-readable), Markdown (for PRs and CI logs) and one
self-contained HTML page (inline SVG charts, sample panels as embedded PNGs, no network)."""
from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from lrformer_edge.cpu import host_cpu
from lrformer_edge.files import atomic_write
from lrformer_edge.postprocess import colorize

PANEL_WIDTH = 256
SERIES_COLOURS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
                  "#ff9da7", "#9c755f", "#bab0ac"]


def _pct(value, digits=2):
    return "-" if value is None else f"{100 * value:.{digits}f}"


def _num(value, fmt):
    return "-" if value is None else format(value, fmt)


def table_rows(run) -> list[dict]:
    rows = []
    for r in run.results:
        drop = r.worst_class_drop
        rows.append({
            "backend": r.backend, "precision": r.precision, "status": r.status,
            "artifact": Path(r.artifact).name,
            "mIoU %": _pct(r.miou), "ΔmIoU pts": _num(r.miou_delta_points, "+.2f"),
            "agreement %": _pct(r.pixel_agreement, 3),
            "worst class drop": "-" if drop is None else
            f"{drop['class']} {drop['drop_points']:+.2f}",
            "logits max-abs": _num(r.logits_max_abs, ".3g"),
            "cosine": _num(r.logits_cosine, ".6f"),
            "median ms": _num(r.median_ms, ".1f"), "p90 ms": _num(r.p90_ms, ".1f"),
            "p99 ms": _num(r.p99_ms, ".1f"), "FPS": _num(r.throughput_fps, ".2f"),
            "peak mem MiB": _num(r.peak_memory_mib, ".0f"), "size MiB": _num(r.artifact_mib, ".1f"),
            "note": r.reason})
    return rows


def cpu_line() -> str:
    """The CPU the run measured on (latency and INT8 accuracy depend on its ISA)."""
    cpu = host_cpu()
    note = cpu.int8_note()
    return f"CPU: {cpu.describe()}." + (f" Note: {note}." if note else "")


def to_json(run, violations, thresholds_version) -> dict:
    return {"created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "dataset": run.dataset, "images": run.results[0].images,
            "input_size": list(run.input_size), "seconds": round(run.seconds, 1),
            "thresholds_version": thresholds_version, "cpu": host_cpu().as_dict(),
            "gate": {"passed": not violations, "violations": [str(v) for v in violations]},
            "class_names": run.class_names, "results": [r.as_dict() for r in run.results]}


def to_markdown(run, violations) -> str:
    rows = table_rows(run)
    headers = list(rows[0])
    lines = [f"## Validation: {run.dataset}, {run.results[0].images} images at "
             f"{run.input_size[0]}x{run.input_size[1]}", "", cpu_line(), "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(row[h]).replace("|", "/") for h in headers) + " |"
              for row in rows]
    lines += ["", "**Gate: PASSED**" if not violations else "**Gate: FAILED**"]
    lines += [f"- {v}" for v in violations]
    return "\n".join(lines) + "\n"


def _png(rgb: np.ndarray) -> str:
    height = max(1, round(rgb.shape[0] * PANEL_WIDTH / rgb.shape[1]))
    small = cv2.resize(rgb, (PANEL_WIDTH, height), interpolation=cv2.INTER_NEAREST)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode()


def _disagreement(image: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB) // 2
    heat = grey.copy()
    heat[reference != labels] = (255, 40, 40)
    return heat


def _figure(src: str, caption: str) -> str:
    return (f"<figure><img src='{src}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _panels(run) -> str:
    palette = run.palette
    blocks = []
    for name, image, truth in run.samples:
        figures = [_figure(_png(image), "image"),
                   _figure(_png(colorize(np.where(truth == 255, 0, truth), palette)),
                           "ground-truth labels"),
                   _figure(_png(colorize(run.predictions[0][name], palette)),
                           "FP32 PyTorch (reference)")]
        reference = run.predictions[0][name]
        for result, predictions in zip(run.results[1:], run.predictions[1:]):
            labels = predictions.get(name)
            if labels is None:
                continue
            agreement = float((labels == reference).mean())
            figures.append(_figure(_png(colorize(labels, palette)), f"{result.name}"))
            figures.append(_figure(_png(_disagreement(image, reference, labels)),
                                   f"{result.name}: disagreement ({100 * agreement:.2f}% agree)"))
        blocks.append(f"<h3>{html.escape(name)}</h3><div class='panels'>{''.join(figures)}</div>")
    return "".join(blocks)


def _class_iou_chart(run) -> str:
    series = [r for r in run.results if r.status == "ok" and r.per_class_iou]
    classes = run.class_names
    group, bar = 14 * len(series) + 10, 14
    width, height, left, top = 60 + group * len(classes), 260, 40, 20
    plot = height - 90
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             f"role='img' aria-label='per-class IoU per backend'>"]
    for tick in (0, 25, 50, 75, 100):
        y = top + plot * (1 - tick / 100)
        parts.append(f"<line x1='{left}' x2='{width}' y1='{y:.1f}' y2='{y:.1f}' stroke='#ddd'/>"
                     f"<text x='{left - 4}' y='{y + 4:.1f}' text-anchor='end' "
                     f"font-size='10'>{tick}</text>")
    for c, name in enumerate(classes):
        x0 = left + 5 + c * group
        for s, result in enumerate(series):
            value = result.per_class_iou[c] if c < len(result.per_class_iou) else None
            if value is None:
                continue
            h = plot * value
            parts.append(f"<rect x='{x0 + s * bar}' y='{top + plot - h:.1f}' width='{bar - 2}' "
                         f"height='{h:.1f}' fill='{SERIES_COLOURS[s % len(SERIES_COLOURS)]}'>"
                         f"<title>{html.escape(result.name)} {html.escape(name)}: "
                         f"{100 * value:.2f}</title></rect>")
        parts.append(f"<text transform='translate({x0 + group / 2 - 5},{top + plot + 10}) "
                     f"rotate(40)' font-size='10'>{html.escape(name)}</text>")
    parts.append("</svg>")
    legend = "".join(f"<span class='key'><i style='background:"
                     f"{SERIES_COLOURS[s % len(SERIES_COLOURS)]}'></i>{html.escape(r.name)}</span>"
                     for s, r in enumerate(series))
    return f"<div class='legend'>{legend}</div>{''.join(parts)}"


def _latency_chart(run) -> str:
    series = [r for r in run.results if r.median_ms is not None]
    if not series:
        return "<p>No latency measured.</p>"
    longest = max(r.p90_ms or r.median_ms for r in series)
    row, left, width = 24, 220, 720
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' "
             f"height='{row * len(series) + 20}' role='img' aria-label='latency per backend'>"]
    for i, r in enumerate(series):
        y = 5 + i * row
        w = (width - left - 80) * r.median_ms / longest
        p90 = (width - left - 80) * (r.p90_ms or r.median_ms) / longest
        parts.append(f"<text x='{left - 6}' y='{y + 14}' text-anchor='end' font-size='12'>"
                     f"{html.escape(r.name)}</text>"
                     f"<rect x='{left}' y='{y}' width='{w:.1f}' height='{row - 6}' "
                     f"fill='{SERIES_COLOURS[i % len(SERIES_COLOURS)]}'/>"
                     f"<line x1='{left + p90:.1f}' x2='{left + p90:.1f}' y1='{y}' "
                     f"y2='{y + row - 6}' stroke='#333'/>"
                     f"<text x='{left + p90 + 6:.1f}' y='{y + 14}' font-size='12'>"
                     f"{r.median_ms:.1f} ms</text>")
    parts.append("</svg>")
    return "".join(parts)


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:4px 6px}
th{background:#f3f3f3}td{text-align:right}td:nth-child(-n+4){text-align:left}
tr.skipped td{color:#888}tr.error td{color:#b00}tr.failed td{background:#fdecec}
.verdict{font-size:18px;font-weight:600;padding:8px 12px;display:inline-block;border-radius:4px}
.pass{background:#e3f4e3;color:#185c18}.fail{background:#fbe3e3;color:#8b1010}
.panels{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0}
figcaption{font-size:11px;max-width:256px}.legend{margin:6px 0}
.key{margin-right:14px;font-size:12px}.key i{display:inline-block;width:10px;height:10px;
margin-right:4px}
"""

# Marks the page as rendered once every embedded image has decoded; a browser test reads it.
READY_SCRIPT = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (img) { return !img.complete || img.naturalWidth === 0; });
  document.body.setAttribute('data-ready', broken.length ? 'broken:' + broken.length : 'ok');
  document.body.setAttribute('data-images', String(images.length));
});
"""


def to_html(run, violations, thresholds_version) -> str:
    rows = table_rows(run)
    headers = list(rows[0])
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    failing = {v.result for v in violations}
    body = "".join(
        f"<tr class='{html.escape(row['status'])}"
        f"{' failed' if result.name in failing else ''}'>"
        + "".join(f"<td>{html.escape(str(row[h]))}</td>" for h in headers) + "</tr>"
        for row, result in zip(rows, run.results))
    verdict = ("<div class='verdict pass'>Gate passed</div>" if not violations else
               "<div class='verdict fail'>Gate failed</div><ul>"
               + "".join(f"<li>{html.escape(str(v))}</li>" for v in violations) + "</ul>")
    title = (f"LRFormer Edge validation: {run.dataset}, {run.results[0].images} images at "
             f"{run.input_size[0]}x{run.input_size[1]}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head>
<body data-ready="pending">
<h1>{html.escape(title)}</h1>
<p>Ground truth: the FP32 PyTorch model. Thresholds version {thresholds_version}.
Run time {run.seconds:.0f} s.</p>
<p id="cpu">{html.escape(cpu_line())}</p>
{verdict}
<h2>Backends</h2>
<table id="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Per-class IoU</h2>{_class_iou_chart(run)}
<h2>Latency (median; line: p90)</h2>{_latency_chart(run)}
<h2>Samples</h2>{_panels(run)}
<script>{READY_SCRIPT}</script>
</body></html>
"""


def write_reports(run, violations, thresholds_version, report_dir: str | Path) -> dict[str, Path]:
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    documents = {
        "report.json": json.dumps(to_json(run, violations, thresholds_version), indent=2),
        "report.md": to_markdown(run, violations),
        "report.html": to_html(run, violations, thresholds_version),
    }
    written = {}
    for name, text in documents.items():
        written[name] = atomic_write(report_dir / name,
                                     lambda tmp, t=text: Path(tmp).write_text(t, encoding="utf-8"))
    return written
