"""The posterior floor: a SWAG posterior on a store (imports nvmlib.backends and nvmlib.errors only).

layout     the arrays, their shapes and the checksummed meta
log        the kept iterates: raw rows or compressed delta records (codec)
moments    the running float64 sums and the fused per-update kernels
journal    the count, the two checkpoint slots, recovery and replay
sampling   the draw formula and the one D·z₂ kernel
posterior  SWAGPosterior, the façade over them
"""
from nvmlib.posterior.posterior import SWAGPosterior

__all__ = ["SWAGPosterior"]
