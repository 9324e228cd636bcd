"""Where an OpenVINO IR spends its time: per-node and per-kernel times of a profiling runner."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrformer_edge.backends.openvino.runner import OpenVINORunner


@dataclass
class LayerProfile:
    """Mean per-node times over repeated inferences, and their sums by (type, kernel)."""

    total_ms: float
    wall_ms: float
    nodes: list  # (ms, node, node_type, kernel), slowest first
    kinds: list  # (ms, count, node_type, kernel), slowest first

    def as_dict(self) -> dict:
        return {"total_ms": self.total_ms, "median_wall_ms": self.wall_ms,
                "by_kind": [dict(zip(("ms", "count", "node_type", "kernel"), k)) for k in self.kinds],
                "nodes": [dict(zip(("ms", "node", "node_type", "kernel"), n)) for n in self.nodes]}


def profile_layers(runner, feed: dict, repeats: int = 20, warmup: int = 3) -> LayerProfile:
    """Run an active ``OpenVINORunner(..., profile=True)`` and average its per-node times."""
    if repeats < 1:
        raise ValueError(f"repeats must be positive, got {repeats}")
    for _ in range(warmup):
        runner.infer(feed)
    per_node: dict = {}
    walls = []
    for _ in range(repeats):
        runner.infer(feed)
        walls.append(runner.last_inference_time * 1e3)
        for layer in runner.layer_times():
            key = (layer.node, layer.node_type, layer.kernel)
            per_node[key] = per_node.get(key, 0.0) + layer.ms / repeats
    kinds: dict = {}
    for (_, node_type, kernel), ms in per_node.items():
        total, count = kinds.get((node_type, kernel), (0.0, 0))
        kinds[(node_type, kernel)] = (total + ms, count + 1)
    nodes = sorted(((ms, *key) for key, ms in per_node.items()), reverse=True)
    by_kind = sorted(((ms, count, *key) for key, (ms, count) in kinds.items()), reverse=True)
    return LayerProfile(sum(per_node.values()), statistics.median(walls), nodes, by_kind)


def profile_table(profile: LayerProfile, top: int = 15) -> str:
    """Markdown: time by node type and kernel, then the ``top`` slowest nodes."""
    total = profile.total_ms or 1.0
    lines = [f"median wall time {profile.wall_ms:.2f} ms; sum of node times {profile.total_ms:.2f} ms",
             "", "| ms | % | nodes | type | kernel |", "|---|---|---|---|---|"]
    lines += [f"| {ms:.2f} | {100 * ms / total:.1f} | {count} | {node_type} | {kernel} |"
              for ms, count, node_type, kernel in profile.kinds if ms > 0]
    lines += ["", f"| ms | % | slowest {top} nodes | type | kernel |", "|---|---|---|---|---|"]
    lines += [f"| {ms:.2f} | {100 * ms / total:.1f} | `{node}` | {node_type} | {kernel} |"
              for ms, node, node_type, kernel in profile.nodes[:top]]
    return "\n".join(lines) + "\n"


def profile_ir(ir: str | Path, precision: str = "f32", threads: int | None = None,
               repeats: int = 20) -> tuple[LayerProfile, dict, Path]:
    """Profile the IR at ``ir`` (.xml, or its folder) at an explicit precision hint on a random
    input of its shape; returns the profile, the runner's settings and the .xml path."""
    runner = OpenVINORunner(ir, precision=precision, threads=threads, profile=True)
    if not runner.input_specs:
        raise ValueError(f"{runner.path} has no inputs to feed")
    spec = runner.input_specs[0]
    shape = tuple(1 if d is None else d for d in spec.shape)
    feed = {spec.name: np.random.default_rng(0).random(shape, np.float32)}
    with runner:
        return profile_layers(runner, feed, repeats), runner.settings, runner.path
