"""nvmlib: SWAG posteriors of neural networks on the memory tier you have."""
from nvmlib.backends import open_store
from nvmlib.module import SWAG, MultiSWAG
from nvmlib.swag import SWAGPosterior

__all__ = ["open_store", "SWAG", "MultiSWAG", "SWAGPosterior"]
__version__ = "0.1.0"
