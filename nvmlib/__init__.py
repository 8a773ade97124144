"""nvmlib: SWAG posteriors of neural networks on the memory tier you have."""
from nvmlib.backends import open_store
from nvmlib.nn import SWAG, MultiSWAG
from nvmlib.posterior import SWAGPosterior

__all__ = ["open_store", "SWAG", "MultiSWAG", "SWAGPosterior"]
__version__ = "0.1.0"
