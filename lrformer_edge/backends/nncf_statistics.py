"""A cache of NNCF calibration statistics, so that re-exporting the same model at the same size
on the same calibration set skips the statistics pass (the slow part of INT8 PTQ).

One cache file per (model weights, input size, calibration set), named after them, under
``files.cache_dir()`` (``$LRFORMER_EDGE_CACHE`` or ``~/.cache/lrformer-edge``) in ``statistics/``. It
holds one entry per quantizer graph (NNCF's OpenVINO and ONNX backends see different graphs of
the same model, so their statistic points differ) and quantizer settings. A file whose recorded key
differs from the export's (another checkpoint, input size or calibration set) is refused with
the differing fields named; it is never used silently. Files are written atomically.

The statistics are NNCF's own aggregated ``TensorStatistic`` values (per statistic point), read
and written with the aggregator's (private, pinned-version) ``_prepare_statistics`` and
``_load_statistics``; NNCF's public ``statistics_path`` exists for weight compression only.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lrformer_edge.artifacts.metadata import UNTRAINED, checkpoint_record
from lrformer_edge.files import atomic_write, cache_dir

_GENERATED_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*_\d+$")
FORMAT_VERSION = 2
_SEPARATOR = "||"


class StatisticsCacheMismatch(ValueError):
    """A cache file made for another model, input size or calibration set."""


@dataclass(frozen=True)
class StatisticsKey:
    """What the statistics depend on: the weights, the input size and the calibration set."""

    weights_sha256: str
    input_size: tuple[int, int]
    calibration_sha256: str

    @classmethod
    def of(cls, model, input_size, calibration) -> StatisticsKey:
        return cls(weights_sha256(model), tuple(int(side) for side in input_size),
                   calibration.sha256)

    def file_name(self) -> str:
        height, width = self.input_size
        return (f"{self.weights_sha256[:16]}-{height}x{width}-"
                f"{self.calibration_sha256[:16]}.npz")

    def differences(self, other: StatisticsKey) -> list[str]:
        names = {"weights_sha256": "model weights (checkpoint)", "input_size": "input size",
                 "calibration_sha256": "calibration set"}
        mine, theirs = asdict(self), asdict(other)
        return [f"{names[field]}: cache {theirs[field]}, export {mine[field]}"
                for field in names if mine[field] != theirs[field]]


def weights_sha256(model) -> str:
    """The checkpoint's SHA-256 where the model came from one; else a digest of its weights
    (an untrained or fine-tuned model in memory has no file to name it)."""
    recorded = checkpoint_record(model)
    if recorded != UNTRAINED:
        return recorded
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tensor.detach().cpu().numpy()).tobytes())
    return digest.hexdigest()


class StatisticsCache:
    """The cache file of one ``StatisticsKey``: entries of NNCF statistics by quantizer graph."""

    def __init__(self, key: StatisticsKey, path: str | Path | None = None):
        self.key = key
        self.path = Path(path) if path is not None else \
            cache_dir() / "statistics" / key.file_name()
        self.entries: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as archive:
                header = json.loads(str(archive["header"]))
                arrays = {name: archive[name] for name in archive.files if name != "header"}
        except (OSError, ValueError, KeyError) as error:
            raise StatisticsCacheMismatch(
                f"statistics cache {self.path} is unreadable ({error}); delete it or pass "
                f"another --statistics-cache") from None
        if header.get("format") != FORMAT_VERSION:
            raise StatisticsCacheMismatch(
                f"statistics cache {self.path} has format {header.get('format')}, this version "
                f"reads {FORMAT_VERSION}; delete it to recompute")
        recorded = StatisticsKey(header["weights_sha256"], tuple(header["input_size"]),
                                 header["calibration_sha256"])
        if recorded != self.key:
            raise StatisticsCacheMismatch(
                f"statistics cache {self.path} was made for another export, refused: "
                + "; ".join(self.key.differences(recorded))
                + ". Delete it, point --statistics-cache elsewhere, or pass --no-statistics-cache")
        for name, array in arrays.items():
            entry, statistic, field = name.split(_SEPARATOR)
            self.entries.setdefault(entry, {}).setdefault(statistic, {})[field] = array

    def write(self) -> None:
        header = {"format": FORMAT_VERSION, **asdict(self.key)}
        arrays = {_SEPARATOR.join((entry, statistic, field)): array
                  for entry, statistics in self.entries.items()
                  for statistic, fields in statistics.items() for field, array in fields.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def save(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, header=np.array(json.dumps(header)), **arrays)

        atomic_write(self.path, save, suffix=".npz")


def statistics_cache_from_args(args) -> str | bool:
    """The exporters' ``statistics_cache`` argument from --statistics-cache /
    --no-statistics-cache (``cli.add_statistics_cache_arguments``)."""
    return False if args.no_statistics_cache else (args.statistics_cache or True)


def open_statistics_cache(model, input_size, calibration,
                          where: str | Path | bool | None = True) -> StatisticsCache | None:
    """The cache for this export: ``True`` the default file under ``cache_dir()``, a path that
    file, ``False``/``None`` no cache. Refuses (``StatisticsCacheMismatch``) a file of another
    export before any work is done."""
    if where is None or where is False:
        return None
    key = StatisticsKey.of(model, input_size, calibration)
    return StatisticsCache(key, None if where is True else where)


def entry_name(backend: str, settings: dict) -> str:
    """One entry per NNCF backend graph and quantizer settings (what decides the statistic
    points and their reducers)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    return f"{backend}-{digest.hexdigest()[:12]}"


# Versioned: what the pass keeps of a tensor may grow, and an older entry then lacks it.
ACTIVATIONS_ENTRY = "onnx-activations-v1"


@dataclass(frozen=True)
class SharedPass:
    """What the shared activation pass (``activation_statistics``) needs from an exporter: the
    FP32 ONNX its backend graph was made from, the calibration batches, and how that backend's
    statistic points name the ONNX's tensors (``nncf_collectors.*_tensor_resolver``, called
    with the backend model, its NNCFGraph, the statistics and the ONNX's path)."""

    onnx_path: Path
    batches: list
    resolver: Callable


class _Unkept:
    """A statistics cache that keeps nothing (--no-statistics-cache): the export still takes its
    activations from the shared pass."""

    path = None

    def __init__(self):
        self.entries: dict = {}

    def write(self) -> None:
        pass


@contextmanager
def cached_nncf_statistics(cache: StatisticsCache | None, settings: dict,
                           shared: SharedPass | None = None,
                           log: Callable[[str], None] = print) -> Iterator[None]:
    """Within this block, NNCF's statistics pass takes every statistic ``cache`` holds from
    it, the activations' from ``shared``'s one pass over the FP32 ONNX (measured once per cache
    and kept in it), and runs NNCF's own pass only for the rest (weights, read from one image;
    anything the shared pass cannot answer). What was not in the cache is added to it."""
    if cache is None and shared is None:
        yield
        return
    import nncf.quantization.algorithms.pipeline as pipeline

    original = pipeline.collect_statistics
    cache = cache if cache is not None else _Unkept()

    def collect(containers, model, graph, dataset):
        return _collect_or_load(cache, settings, shared, containers, model, graph, dataset,
                                original, log)

    pipeline.collect_statistics = collect
    try:
        yield
    finally:
        pipeline.collect_statistics = original


@dataclass(eq=False)
class _Point:
    key: str | None  # None: a collector without a statistic class (cannot be stored)
    statistic_point: object
    collector: object
    algorithm: str
    container: type | None = None
    aliases: tuple = ()


def _collect_or_load(cache, settings, shared, containers, model, graph, dataset, original, log):
    from nncf.common.factory import StatisticsAggregatorFactory

    aggregator = StatisticsAggregatorFactory.create(model, dataset)
    for container in containers if isinstance(containers, list) else [containers]:
        aggregator.register_statistic_points(container)
    entry = entry_name(type(aggregator).__name__, settings)
    stored = cache.entries.get(entry, {})
    points = _points(aggregator, graph)
    pending = []
    for point in points:
        fields = _stored_statistic(stored, point.key, point.aliases) if point.key else None
        if fields is None:
            pending.append(point)
        else:
            point.collector.set_cache(_statistic(point.container, fields))
    shared_points, source = _fill_from_shared_pass(cache, shared, pending, model, graph) \
        if pending and shared is not None else ([], "")
    left = [point for point in pending if point not in shared_points]
    if left:
        # NNCF reads as many images as its remaining collectors ask for: one for weights.
        original(_container_of(left), model, graph, dataset)
    new = {point.key: {field: np.asarray(value.data) for field, value in
                       point.collector.get_statistics().get_data(is_serialized=True).items()}
           for point in shared_points + left if point.key is not None}
    if new:
        cache.entries.setdefault(entry, {}).update(new)
        cache.write()
    log("calibration statistics: " + _summary(len(points) - len(pending), len(shared_points),
                                              source, len(left), cache.path))
    return aggregator.statistic_points


def _summary(reused: int, shared: int, source: str, by_nncf: int, path) -> str:
    parts = [f"{reused} reused", f"{shared} from the shared activation pass ({source})",
             f"{by_nncf} by NNCF (weights and what the shared pass cannot answer)"]
    kept = f"; cache {path}" if path is not None else "; not cached (--no-statistics-cache)"
    return ", ".join(part for part, count in zip(parts, (reused, shared, by_nncf)) if count) \
        + kept


def _fill_from_shared_pass(cache, shared: SharedPass, pending, model, graph):
    """(the pending points filled from the shared activation statistics, where those came
    from)."""
    from lrformer_edge.backends.nncf_collectors import fill_collector, is_activation_point

    activation_points = [p for p in pending if is_activation_point(p.statistic_point.target_point)]
    if not activation_points:
        return [], ""
    activations, source = _shared_activations(cache, shared)
    resolve = shared.resolver(model, graph, activations, shared.onnx_path)
    filled = []
    for point in activation_points:
        tensor = resolve(point.statistic_point.target_point)
        if tensor is not None and fill_collector(point.collector, tensor, activations):
            filled.append(point)
    return filled, source


def _shared_activations(cache, shared: SharedPass):
    from lrformer_edge.backends.activation_statistics import (
        ActivationStatistics,
        measure_activation_statistics,
    )

    # Tensor names are only meaningful in the graph that named them.
    entry = f"{ACTIVATIONS_ENTRY}-{_graph_digest(shared.onnx_path)[:12]}"
    if entry in cache.entries:
        return ActivationStatistics.from_entry(cache.entries[entry]), "reused"
    activations = measure_activation_statistics(shared.onnx_path, shared.batches)
    cache.entries[entry] = activations.to_entry()
    return activations, "measured now"


def _graph_digest(onnx_path) -> str:
    """SHA-256 of the ONNX's structure (nodes, their types and tensor names), not its weights."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    digest = hashlib.sha256()
    for node in graph.node:
        digest.update("|".join([node.op_type, *node.input, "->", *node.output]).encode())
    return digest.hexdigest()


def _container_of(points):
    from nncf.common.tensor_statistics.statistic_point import (
        StatisticPoint,
        StatisticPointsContainer,
    )

    container = StatisticPointsContainer()
    for point in points:
        container.add_statistic_point(StatisticPoint(
            point.statistic_point.target_point, point.collector, point.algorithm))
    return container


def _points(aggregator, graph) -> list[_Point]:
    """The registered collectors, each keyed by NNCF's statistics key (where it has a statistic
    class; a plain-dict collector cannot be stored), with alias keys.

    The key is NNCF's, with generated node names (``Multiply_455740``: numbered from a
    process-wide counter, so they differ from one export to the next) replaced by the node's
    place in the graph's topological order. The aliases are the keys of the same statistic on
    the same tensor at its other points (the producer's output, each consumer's input): an
    ignored scope (a precision config's float layers) moves an activation quantizer from a
    tensor's producer onto the inputs of the consumers that stay quantized, and its statistic
    stays what it was."""
    stable = _stable_node_names(graph)

    def key_of(container, target_point) -> str:
        key = aggregator._get_statistics_key(object.__new__(container), target_point)
        name = target_point.target_node_name
        return key.replace(name, stable.get(name, name), 1)

    points = []
    for algorithm, point, collector in aggregator.statistic_points.get_tensor_collectors():
        container = collector._stat_container
        if container is None:
            points.append(_Point(None, point, collector, algorithm))
            continue
        aliases = tuple(key_of(container, other)
                        for other in _points_on_same_tensor(graph, point.target_point))
        points.append(_Point(key_of(container, point.target_point), point, collector, algorithm,
                             container, aliases))
    return points


def _points_on_same_tensor(graph, target_point) -> list:
    """The other activation points that see the tensor ``target_point`` sees: its producer's
    output and its consumers' inputs (none for weights and other target types)."""
    from nncf.common.graph.transformations.commands import TargetType

    node = graph.get_node_by_name(target_point.target_node_name)
    if target_point.type == TargetType.PRE_LAYER_OPERATION:
        edges = [e for e in graph.get_input_edges(node)
                 if e.input_port_id == target_point.port_id]
        if not edges:
            return []
        producer, port = edges[0].from_node, edges[0].output_port_id
    elif target_point.type == TargetType.POST_LAYER_OPERATION:
        producer, port = node, target_point.port_id
    else:
        return []
    point_type = type(target_point)
    points = [point_type(TargetType.POST_LAYER_OPERATION, producer.node_name, port)]
    points += [point_type(TargetType.PRE_LAYER_OPERATION, e.to_node.node_name, e.input_port_id)
               for e in graph.get_output_edges(producer) if e.output_port_id == port]
    return [p for p in points if (p.type, p.target_node_name, p.port_id) !=
            (target_point.type, target_point.target_node_name, target_point.port_id)]


def _stored_statistic(stored: dict, key: str, aliases) -> dict | None:
    """The stored fields of ``key``, else of an alias holding a per-tensor statistic (one value
    per field: the same whichever point of the tensor measured it; per-channel statistics are
    reduced along the consumer's channel axis, so only their own key is trusted)."""
    if key in stored:
        return stored[key]
    for alias in aliases:
        fields = stored.get(alias)
        if fields and all(np.asarray(array).size == 1 for array in fields.values()):
            return fields
    return None


def _stable_node_names(graph) -> dict[str, str]:
    return {node.node_name: f"#{index}:{node.node_type}"
            for index, node in enumerate(graph.topological_sort())
            if _GENERATED_NAME.match(node.node_name)}


def _statistic(container, fields: dict[str, np.ndarray]):
    """An NNCF statistic of class ``container`` holding ``fields`` (numpy: the OpenVINO and ONNX
    backends' tensors)."""
    from nncf.tensor import Tensor

    statistic = object.__new__(container)
    statistic.load_data({field: Tensor(np.array(array)) for field, array in fields.items()})
    return statistic
