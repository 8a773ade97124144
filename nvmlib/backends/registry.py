"""Name -> tier table; optional tiers import lazily and say how to install what they miss."""

from __future__ import annotations

import importlib
from pathlib import Path

from nvmlib.backends.base import Store
from nvmlib.errors import StoreError, TierUnavailable

# name: ("module:Class", install hint shown when the tier's dependency is missing)
TIERS: dict[str, tuple[str, str]] = {
    "dram": ("nvmlib.backends.dram:DramStore", ""),
    "mmap": ("nvmlib.backends.mmap:MmapStore", ""),
    "pmem": (
        "nvmlib.backends.pmem:PmemStore",
        "install PMDK's libpmem: `apt-get install libpmem1` (Debian/Ubuntu) or `dnf install "
        "libpmem`",
    ),
    "pymm": (
        "nvmlib.backends.pymm:PymmStore",
        "build IBM's standalone PyMM (github.com/IBM/pymm, commit a506739) into this Python "
        "environment, as the 'PyMM' section of docs/tiers.md shows; the PyPI package named 'pymm' "
        "is unrelated, do not install it",
    ),
    "zarr": ("nvmlib.backends.zarr:ZarrStore", "pip install 'nvmlib[zarr]'"),
}


def tier_class(kind: str) -> type[Store]:
    """The Store class registered under `kind`, importing it on first use."""
    if kind not in TIERS:
        raise StoreError(f"unknown memory tier {kind!r}; choose one of {', '.join(TIERS)}")
    target, hint = TIERS[kind]
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("nvmlib.backends"):
            raise TierUnavailable(f"tier {kind!r} is not built into this nvmlib version") from exc
        raise TierUnavailable(f"tier {kind!r} needs {exc.name!r}: {hint}") from exc
    return getattr(module, cls_name)


def open_store(kind: str, path: str | Path | None = None, **options) -> Store:
    """Open (creating if needed) the store of tier `kind` at `path` (a directory, device or URL)."""
    cls = tier_class(kind)
    cls.check_available()
    return cls(path, **options)


def available_tiers() -> dict[str, str]:
    """Each registered tier -> "ok" or the reason it cannot be used on this machine."""
    status = {}
    for kind in TIERS:
        try:
            tier_class(kind).check_available()
            status[kind] = "ok"
        except StoreError as exc:
            status[kind] = str(exc)
    return status
