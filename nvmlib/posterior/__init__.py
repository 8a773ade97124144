"""The posterior floor: a SWAG posterior on a store (imports nvmlib.backends and nvmlib.errors
only).

layout     the arrays, their shapes and the checksummed meta
log        the kept iterates: raw rows or compressed delta records (codec)
moments    the running float64 sums and the fused per-update kernels
journal    the count, the two checkpoint slots, recovery and replay
sampling   the draw formula and the one D·z₂ kernel
posterior  SWAGPosterior, the façade over them
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nvmlib.posterior.posterior import SWAGPosterior

__all__ = ["SWAGPosterior"]


def __getattr__(name: str) -> Any:
    """SWAGPosterior, imported when first used: the floor's light modules (layout, codec) load
    without torch."""
    if name != "SWAGPosterior":
        raise AttributeError(f"module 'nvmlib.posterior' has no attribute {name!r}")
    from nvmlib.posterior.posterior import SWAGPosterior

    return SWAGPosterior
