"""Accuracy of a SegmentationPipeline on labelled samples (any backend, same path)."""
from __future__ import annotations

from collections.abc import Iterable

from lrformer_edge.data.datasets import IGNORE_INDEX, Sample
from lrformer_edge.data.procedural import generate_scene
from lrformer_edge.data.splits import TEST_SEED_START
from lrformer_edge.metrics import ConfusionMatrix
from lrformer_edge.pipeline import SegmentationPipeline
from lrformer_edge.progress import track


def procedural_validation_samples(count: int, size: tuple[int, int] = (512, 512),
                                  first_seed: int = TEST_SEED_START) -> Iterable[Sample]:
    """Held-out scenes generated in memory: seeds used neither in training nor for choosing
    checkpoints (the training run's validation split starts at VAL_SEED_START)."""
    for seed in range(first_seed, first_seed + count):
        scene = generate_scene(seed, *size)
        yield Sample(scene.image, scene.label, f"procedural_{seed:08d}")


def procedural_validation_set(count: int, size: tuple[int, int] = (512, 512)) -> list[Sample]:
    """``procedural_validation_samples`` generated now, with progress (a 512x512 scene takes
    about 0.5 s on 2 cores: 100 scenes would be a silent minute)."""
    return list(track(procedural_validation_samples(count, size), count, "scenes",
                      "generating held-out scenes"))


def load_samples(data: str | None, images: int, size: tuple[int, int]) -> tuple[list, str]:
    """(samples, description): the first ``images`` of a dataset's val split, or procedural
    held-out scenes."""
    if images < 1:
        raise ValueError(f"--images must be positive, got {images}")
    if data is None:
        return (procedural_validation_set(images, size),
                "procedural held-out scenes (seeds 20,000,000+)")
    from lrformer_edge.data.datasets import open_dataset

    dataset = open_dataset(data, "val")
    count = min(images, len(dataset))
    return ([dataset[i] for i in track(range(count), what="images", label=f"reading {data}")],
            f"{data} (val, first {count})")


def confusion_of(pipeline, samples: Iterable[Sample], on_prediction=None,
                 total: int | None = None,
                 label: str = "evaluation") -> tuple[ConfusionMatrix, list[float]]:
    """Confusion matrix and per-image inference seconds of ``pipeline`` over ``samples``;
    progress is shown as ``label`` (``total``: the number of samples of a generator)."""
    matrix = ConfusionMatrix(pipeline.data.num_classes, IGNORE_INDEX)
    seconds = []
    for sample in track(samples, total, "images", label):
        prediction = pipeline.predict(sample.image)
        matrix.update(sample.label, prediction.labels)
        seconds.append(prediction.inference_seconds)
        if on_prediction is not None:
            on_prediction(sample, prediction)
    return matrix, seconds


def evaluate_pipeline(pipeline, samples: Iterable[Sample], on_prediction=None,
                      reference_labels: dict | None = None, total: int | None = None,
                      label: str = "evaluation") -> dict:
    """mIoU & co. of ``pipeline`` over ``samples``; ``on_prediction(sample, prediction)`` sees each.
    Progress is shown as ``label`` (``total``: the number of samples of a generator).

    With ``reference_labels`` (sample name -> label map, e.g. the PyTorch model's predictions)
    the result also holds ``pixel_agreement``, the mean fraction of pixels labelled the same.
    """
    agreements = []

    def observe(sample, prediction):
        if reference_labels is not None:
            agreements.append(float((reference_labels[sample.name] == prediction.labels).mean()))
        if on_prediction is not None:
            on_prediction(sample, prediction)

    matrix, seconds = confusion_of(pipeline, samples, observe, total, label)
    metrics = matrix.compute()
    metrics["images"] = len(seconds)
    metrics["inference_seconds"] = seconds
    if reference_labels is not None:
        metrics["pixel_agreement"] = sum(agreements) / max(1, len(agreements))
    return metrics


def keep_labels(into: dict):
    """An ``on_prediction`` callback storing each prediction's labels by sample name."""
    return lambda sample, prediction: into.__setitem__(sample.name, prediction.labels)


def against_ground_truth(model, pipeline, samples: Iterable[Sample],
                         input_size: tuple[int, int], name: str = "the artifact") -> dict:
    """mIoU of ``pipeline`` (``name`` in the progress lines) and of the FP32 PyTorch ``model``
    (the ground truth) on the same samples, the mIoU delta in points and the pixel agreement
    between the two."""
    samples = list(samples)
    reference_labels: dict = {}
    with SegmentationPipeline.from_model(model, input_size) as reference:
        truth = evaluate_pipeline(reference, samples, keep_labels(reference_labels),
                                  label="FP32 PyTorch ground truth")
    with pipeline:
        candidate = evaluate_pipeline(pipeline, samples, reference_labels=reference_labels,
                                      label=name)
    return {"images": len(samples), "reference_mIoU": truth["mIoU"], "mIoU": candidate["mIoU"],
            "mIoU_delta_points": 100 * (candidate["mIoU"] - truth["mIoU"]),
            "pixel_agreement": candidate["pixel_agreement"],
            "median_ms": 1000 * sorted(candidate["inference_seconds"])[len(samples) // 2]}


def describe_against_ground_truth(result: dict, name: str) -> str:
    return (f"{name} on {result['images']} procedural validation images: mIoU "
            f"{100 * result['mIoU']:.2f} vs {100 * result['reference_mIoU']:.2f} FP32 PyTorch "
            f"({result['mIoU_delta_points']:+.2f} points), pixel agreement "
            f"{100 * result['pixel_agreement']:.2f}%, median {result['median_ms']:.0f} ms")


def proxy_accuracy(model, proxy, images: int, input_size) -> dict:
    """mIoU of ``proxy`` (a PyTorch model computing what an artifact computes where the artifact
    cannot run, e.g. ``backends.coreml.export.proxy_model`` of a Core ML package) and of the FP32
    ``model`` on ``images`` held-out procedural scenes at the artifact's ``input_size``, with
    their pixel agreement (``against_ground_truth``)."""
    size = tuple(input_size)
    result = against_ground_truth(model, SegmentationPipeline.from_model(proxy, size),
                                  procedural_validation_set(images, size), size, "PyTorch proxy")
    return {"images": result["images"], "fp32_mIoU": result["reference_mIoU"],
            "proxy_mIoU": result["mIoU"], "pixel_agreement": result["pixel_agreement"],
            "weights_read_back": getattr(proxy, "package_weights_loaded", None)}
