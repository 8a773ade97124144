"""`nvmlib probe [PATH]`: which memory tiers this machine offers, and how fast a path is.

Reports fsdax mounts (the dax mount option), devdax devices (/dev/dax*), whether libpmem
loads and sees a path as persistent memory, whether IBM PyMM imports, free space, and for
a directory its sequential write and read bandwidth (O_DIRECT like `dd oflag=direct` where
the file system supports it, else buffered writes + fdatasync and reads after dropping the
file from the page cache): the limit benchmarks compare the tiers with.
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from nvmlib.backends import available_tiers
from nvmlib.backends.files import disk_free
from nvmlib.errors import StoreError

BLOCK = 8 << 20
DEFAULT_BYTES = 256 << 20


def fsdax_mounts(mounts: str = "/proc/mounts") -> list[dict[str, str]]:
    """Mounted file systems with the dax option: [{device, mount, fstype, options}]."""
    found = []
    with open(mounts) as f:
        for line in f:
            device, mount, fstype, options = line.split()[:4]
            if any(
                o == "dax" or o.startswith("dax=") and o != "dax=never" for o in options.split(",")
            ):
                found.append(
                    {"device": device, "mount": mount, "fstype": fstype, "options": options}
                )
    return found


def devdax_devices(dev: Path = Path("/dev")) -> list[dict[str, Any]]:
    """Character devices /dev/daxN.M with their size (from sysfs) when known."""
    found = []
    for path in sorted(dev.glob("dax*")):
        if not stat.S_ISCHR(path.stat().st_mode):
            continue
        size_file = Path("/sys/bus/dax/devices") / path.name / "size"
        size = int(size_file.read_text()) if size_file.exists() else None
        found.append({"path": str(path), "size_bytes": size})
    return found


def sequential_bandwidth(path: str | Path, nbytes: int = DEFAULT_BYTES) -> dict[str, Any]:
    """Sequential write then read MB/s of a temporary file of `nbytes` in directory `path`."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(
            f"{path} is not a directory; bandwidth is measured with a temporary file in one"
        )
    try:
        return _measure(path, nbytes)
    except OSError as exc:
        raise StoreError(
            f"cannot measure {path}: a temporary file of {nbytes >> 20} MiB cannot be created, "
            f"written and read there ({exc.strerror or exc}); pass a directory you can write "
            "to with that much free space, or --size-mb 0 to skip the measurement"
        ) from None


def _measure(path: Path, nbytes: int) -> dict[str, Any]:
    """sequential_bandwidth's measurement; OSError when the file cannot be created, written or
    read."""
    block = min(BLOCK, max(mmap.PAGESIZE, nbytes))
    with mmap.mmap(-1, block) as buf:  # page aligned, as O_DIRECT needs
        buf.write(os.urandom(block))
        fd, name = tempfile.mkstemp(dir=path, prefix=".nvmlib-probe-")
        os.close(fd)
        try:
            fd, direct = _open(name, os.O_WRONLY)
            try:
                t0 = time.perf_counter()
                for _ in range(nbytes // block):
                    os.write(fd, buf)
                os.fdatasync(fd)
                write_s = time.perf_counter() - t0
            finally:
                os.close(fd)
            fd, _ = _open(name, os.O_RDONLY)
            try:
                t0 = time.perf_counter()
                while os.readv(fd, [buf]) > 0:
                    pass
                read_s = time.perf_counter() - t0
            finally:
                os.close(fd)
        finally:
            os.unlink(name)
    done = nbytes // block * block
    return {
        "bytes": done,
        "direct": direct,
        "write_MBps": done / 1e6 / write_s,
        "read_MBps": done / 1e6 / read_s,
    }


def _open(name: str, flags: int) -> tuple[int, bool]:
    """(descriptor, True) opened with O_DIRECT, or (descriptor, False) where the file system refuses
    O_DIRECT, the file then dropped from the page cache so that reads come from the device."""
    try:
        return os.open(name, flags | os.O_DIRECT), True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    fd = os.open(name, flags)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd, False


def _path_report(path: Path, nbytes: int) -> dict[str, Any]:
    """What `path` (a directory or a devdax device) is; StoreError for anything else."""
    if not path.exists():
        raise StoreError(f"{path} does not exist; pass a directory or a devdax device to examine")
    device = stat.S_ISCHR(path.stat().st_mode)
    if not device and not path.is_dir():
        raise StoreError(
            f"{path} is a file, not a directory or a devdax device; pass the directory it is "
            f"in ({path.parent}) to examine that"
        )
    report: dict[str, Any] = {"path": str(path), "kind": "devdax device" if device else "directory"}
    if not device:
        report["free_bytes"] = disk_free(path)
    try:
        from nvmlib.backends.libpmem import Mapping, is_pmem_dir

        report["is_pmem"] = Mapping(path).is_pmem if device else is_pmem_dir(path)
    except StoreError as exc:
        report["is_pmem"] = None
        report["is_pmem_error"] = str(exc)
    if path.is_dir() and nbytes > 0:
        report["bandwidth"] = sequential_bandwidth(path, nbytes)
    return report


def probe(path: str | Path | None = None, nbytes: int = DEFAULT_BYTES) -> dict[str, Any]:
    """What this machine offers: tiers, fsdax mounts, devdax devices, and `path` measured."""
    result: dict[str, Any] = {
        "tiers": available_tiers(),
        "fsdax_mounts": fsdax_mounts(),
        "devdax_devices": devdax_devices(),
    }
    if path is not None:
        result["path"] = _path_report(Path(path).expanduser(), nbytes)
    return result


def format_probe(result: dict[str, Any]) -> str:
    """The probe result as a short report for humans."""
    lines = ["memory tiers:"]
    lines += [f"  {kind:6} {status}" for kind, status in result["tiers"].items()]
    lines.append(
        "fsdax mounts: "
        + (
            ", ".join(
                f"{m['mount']} ({m['device']}, {m['fstype']})" for m in result["fsdax_mounts"]
            )
            or "none"
        )
    )
    lines.append(
        "devdax devices: "
        + (
            ", ".join(
                d["path"] + (f" ({d['size_bytes'] / 1e9:.1f} GB)" if d["size_bytes"] else "")
                for d in result["devdax_devices"]
            )
            or "none"
        )
    )
    p = result.get("path")
    if p:
        lines.append(f"{p['path']}: {p['kind']}")
        if "free_bytes" in p:
            lines.append(f"  free: {p['free_bytes'] / 1e9:.1f} GB")
        pm = {True: "yes (pmem_persist)", False: "no (the pmem tier will use msync)"}.get(
            p["is_pmem"], "unknown"
        )
        lines.append(
            f"  persistent memory: {pm}"
            + (f" ({p['is_pmem_error']})" if "is_pmem_error" in p else "")
        )
        bw = p.get("bandwidth")
        if bw:
            how = "O_DIRECT" if bw["direct"] else "buffered + fdatasync"
            lines.append(
                f"  sequential write {bw['write_MBps']:.0f} MB/s, read {bw['read_MBps']:.0f} MB/s "
                f"({bw['bytes'] >> 20} MiB, {how})"
            )
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `probe [PATH] [--size-mb N]` to the nvmlib command line."""
    from nvmlib.paper.arguments import number

    parser = subparsers.add_parser(
        "probe", help="which memory tiers this machine offers, and how fast PATH is"
    )
    parser.add_argument(
        "path", nargs="?", help="a directory (or devdax device) to examine and measure"
    )
    parser.add_argument(
        "--size-mb",
        type=number(int, 0, "a size in MiB >= 0 (0: do not measure)"),
        default=DEFAULT_BYTES >> 20,
        help="size of the temporary file that measures bandwidth (0: do not measure)",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace, script_start: float | None = None) -> int:
    """Print the probe report (script_start: nvmlib.paper.cli's calling convention, unused)."""
    print(format_probe(probe(args.path, args.size_mb << 20)))
    return 0
