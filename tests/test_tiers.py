"""The Store contract (tests/contract.py: TierContract), run over every tier of contract.TIERS."""

from __future__ import annotations

import os
import stat

from contract import TierContract, per_tier

from nvmlib.backends.pmem import device_lock_path

globals().update(per_tier(TierContract))


def test_device_locks_live_in_a_private_directory(tmp_path):
    where = device_lock_path(tmp_path / "dax0.0", "swag.log").parent
    st = os.lstat(where)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077
