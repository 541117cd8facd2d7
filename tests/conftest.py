"""Shared fixtures: the generated suite (tiny), the real-data location, threads."""
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout (or $DINO_SHARED_DATA); None if absent."""
    candidates = [os.environ.get("DINO_SHARED_DATA"), REPO.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def cifar10_sample() -> Path:
    """The real CIFAR-10 ImageFolder sample in shared data; skips the test when absent."""
    shared = shared_data_dir()
    sample = shared / "cifar10_jpeg" / "imagefolder_small" if shared else None
    if sample is None or not sample.is_dir():
        pytest.skip("real CIFAR-10 sample (../shared/data/cifar10_jpeg/imagefolder_small) not present")
    return sample


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory):
    """A small generated classification suite: 10 classes x 12 train / 4 val, 32 px."""
    from data.suite_classification import write_classification
    root = tmp_path_factory.mktemp("suite")
    write_classification(root, n_train_per_class=12, n_val_per_class=4, image_size=32, seed=0, progress=False)
    return root / "classification"


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """Restore torch's thread count after each test: a bench's main() called in-process sets its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped on a machine without a CUDA GPU (``make gpu-check`` runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by make gpu-check)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
