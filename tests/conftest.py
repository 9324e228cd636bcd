from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lrformer_edge.reference import DEFAULT_REFERENCE_DIR

# One thread per pytest-xdist worker (they share the cores), two at most otherwise.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else
                      max(1, min(2, torch.get_num_threads())))

# The test files that take longest, longest first (seconds on 2 AVX2 cores, 2026-11-28). Two
# workers take files in collection order (--dist loadfile --no-loadscope-reorder), so starting
# with these leaves short files for the end instead of one long file running alone.
LONGEST_FILES = ("test_qat.py", "test_coreml.py", "test_deploy_onnx.py", "test_cli.py",
                 "test_tensorrt.py", "test_executorch.py", "test_openvino.py",
                 "test_executorch_qat.py", "test_cpu_isa.py", "test_executorch_lowering.py",
                 "test_validation.py", "test_statistics_cache.py", "test_shared_statistics.py",
                 "test_camera_demo.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: a file's own tests keep their order


@pytest.fixture(scope="session", autouse=True)
def statistics_cache_dir(tmp_path_factory):
    """The suite's calibration statistics cache (and its CLI subprocesses'): never the user's."""
    from lrformer_edge.files import CACHE_ENV

    folder = tmp_path_factory.mktemp("lrformer-edge-cache")
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture(scope="session")
def reference_dir():
    if not (DEFAULT_REFERENCE_DIR / "lrformer-t.golden.npz").is_file():
        pytest.skip(f"official reference data not found at {DEFAULT_REFERENCE_DIR} "
                    f"(a checkout keeps shared/ beside the repository)")
    return DEFAULT_REFERENCE_DIR


@pytest.fixture(scope="session")
def tiny_model():
    import lrformer_edge

    torch.manual_seed(0)
    return lrformer_edge.create_model("lrformer-test")


@pytest.fixture
def rgb_image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
