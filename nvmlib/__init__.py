"""nvmlib: SWAG posteriors of neural networks on the memory tier you have.

The public names are imported when first used (PEP 562), so that `import nvmlib.backends` (a
tier alone, a CLI's argument parsing) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nvmlib.backends import open_store
    from nvmlib.nn import SWAG, MultiSWAG
    from nvmlib.posterior import SWAGPosterior

_WHERE = {
    "open_store": "nvmlib.backends",
    "SWAG": "nvmlib.nn",
    "MultiSWAG": "nvmlib.nn",
    "SWAGPosterior": "nvmlib.posterior",
}
__all__ = ["open_store", "SWAG", "MultiSWAG", "SWAGPosterior"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'nvmlib' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
