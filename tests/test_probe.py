"""nvmlib probe: a real probe of a temporary directory (small file), and its report."""

from __future__ import annotations

import subprocess

import pytest

from nvmlib.errors import StoreError
from nvmlib.paper import probe as probe_mod
from nvmlib.paper.cli import main


def test_probe_measures_a_directory(tmp_path):
    result = probe_mod.probe(tmp_path, nbytes=16 << 20)
    assert result["tiers"]["dram"] == "ok" and isinstance(result["fsdax_mounts"], list)
    path = result["path"]
    assert path["kind"] == "directory" and path["free_bytes"] > 0
    bw = path["bandwidth"]
    assert bw["bytes"] == 16 << 20 and bw["write_MBps"] > 0 and bw["read_MBps"] > 0
    assert list(tmp_path.iterdir()) == [], "the temporary file is removed"
    text = probe_mod.format_probe(result)
    assert "sequential write" in text and str(tmp_path) in text


def test_fsdax_mounts_are_read_from_the_dax_option(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/pmem0 /mnt/pmem0 ext4 rw,relatime,dax 0 0\n"
        "/dev/pmem1 /mnt/pmem1 xfs rw,dax=always 0 0\n"
        "/dev/vda / ext4 rw,dax=never 0 0\n"
        "tmpfs /dev/shm tmpfs rw 0 0\n"
    )
    assert [m["mount"] for m in probe_mod.fsdax_mounts(str(mounts))] == ["/mnt/pmem0", "/mnt/pmem1"]


def test_bandwidth_needs_a_directory(tmp_path):
    with pytest.raises(StoreError, match="not a directory"):
        probe_mod.sequential_bandwidth(tmp_path / "missing", 1 << 20)


def test_cli_wiring(tmp_path, capsys):
    assert main(["probe", str(tmp_path), "--size-mb", "4"]) == 0
    out = capsys.readouterr().out
    assert "memory tiers:" in out and "MB/s" in out


def test_a_directory_where_nothing_can_be_created_is_a_store_error():
    with pytest.raises(StoreError, match=r"cannot measure /proc: .*--size-mb 0 to skip"):
        probe_mod.sequential_bandwidth("/proc", 1 << 20)


def test_a_full_disk_is_a_store_error_and_leaves_nothing_behind(tmp_path):
    """A 4 MiB tmpfs (mounting needs root) cannot hold the 16 MiB probe file."""
    small = tmp_path / "small"
    small.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        with pytest.raises(StoreError, match="No space left on device"):
            probe_mod.sequential_bandwidth(small, 16 << 20)
        assert list(small.iterdir()) == [], "the temporary file is removed"
    finally:
        subprocess.run(
            ["umount", "--lazy", str(small)], check=True
        )  # even with a descriptor left open
