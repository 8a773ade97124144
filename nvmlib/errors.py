"""Errors raised by nvmlib, each phrased in the user's terms with the fix."""


class NvmlibError(Exception):
    """Base class of every error nvmlib raises on purpose."""


class StoreError(NvmlibError):
    """A memory tier cannot do what was asked (missing array, bad path, no space...)."""


class TierUnavailable(StoreError):
    """An optional tier's dependency is not installed; the message says how to get it."""


class LockedError(StoreError):
    """Another process already writes to this posterior."""


class PosteriorError(NvmlibError):
    """A posterior is missing, corrupt, or does not match what the caller expects."""


class ConfigError(NvmlibError):
    """A run was configured with something that does not exist (model, device, path...)."""


class DataError(NvmlibError):
    """A data set is missing, damaged, or not the one expected; the message says how to get it."""


class SnapshotError(PosteriorError):
    """A reader's snapshot was overtaken: the writer has since overwritten rows it holds."""


class InputError(NvmlibError, ValueError):
    """A value passed to nvmlib (an iterate, an argument) cannot be used; the message says why."""


class ResourceError(NvmlibError):
    """The machine has too little memory or disk for what was asked; the message says need and
    have."""


class NotebookError(NvmlibError):
    """A notebook of the reproduction failed; the message names it, the error and its executed
    copy."""
