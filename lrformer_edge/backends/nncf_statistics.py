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


@contextmanager
def cached_nncf_statistics(cache: StatisticsCache | None, settings: dict,
                           log: Callable[[str], None] = print) -> Iterator[None]:
    """Within this block, NNCF's statistics pass reads ``cache`` when it holds every statistic
    the quantizer asks for, and otherwise runs and adds what it measured to the cache."""
    if cache is None:
        yield
        return
    import nncf.quantization.algorithms.pipeline as pipeline

    original = pipeline.collect_statistics

    def collect(containers, model, graph, dataset):
        return _collect_or_load(cache, settings, containers, model, graph, dataset, original, log)

    pipeline.collect_statistics = collect
    try:
        yield
    finally:
        pipeline.collect_statistics = original


def _collect_or_load(cache, settings, containers, model, graph, dataset, original, log):
    from nncf.common.factory import StatisticsAggregatorFactory

    aggregator = StatisticsAggregatorFactory.create(model, dataset)
    for container in containers if isinstance(containers, list) else [containers]:
        aggregator.register_statistic_points(container)
    entry = entry_name(type(aggregator).__name__, settings)
    stored = cache.entries.get(entry, {})
    collectors = _keyed_collectors(aggregator, graph)
    found = {key: _stored_statistic(stored, key, aliases)
             for key, (_, _, aliases) in collectors.items()}
    if collectors and all(fields is not None for fields in found.values()):
        for key, (container, collector, _) in collectors.items():
            collector.set_cache(_statistic(container, found[key]))
        log(f"calibration statistics: {len(collectors)} reused from {cache.path}")
        return aggregator.statistic_points
    # The pass fills the collectors of ``containers``, which ``collectors`` holds.
    collected = original(containers, model, graph, dataset)
    measured = {key: {field: np.asarray(value.data) for field, value in
                      collector.get_statistics().get_data(is_serialized=True).items()}
                for key, (_, collector, _) in collectors.items()}
    cache.entries.setdefault(entry, {}).update(measured)
    cache.write()
    log(f"calibration statistics: {len(measured)} measured, cached in {cache.path}")
    return collected


def _keyed_collectors(aggregator, graph) -> dict:
    """{statistics key: (statistic class, tensor collector, alias keys)} of the registered
    points; collectors without a statistic class (plain dicts) cannot be stored and are left
    out.

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

    keyed = {}
    for _, point, collector in aggregator.statistic_points.get_tensor_collectors():
        container = collector._stat_container
        if container is not None:
            aliases = [key_of(container, other)
                       for other in _points_on_same_tensor(graph, point.target_point)]
            keyed[key_of(container, point.target_point)] = (container, collector, aliases)
    return keyed


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
