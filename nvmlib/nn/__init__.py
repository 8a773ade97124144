"""The torch floor: SWAG and MultiSWAG for any module, on nvmlib.posterior (imports it, the
backends and the errors; never the workbook, nvmlib.paper, or the optional field libraries).

swag        SWAG: collect a module's parameters, draw models, predict
multiswag   MultiSWAG: M runs side by side, one average over them
predict     loaders, loading a flat vector into a module, probabilities, the one BMA
staging     the copy of parameters off the device, and the flat-vector layout of a module
sharded     DDP and FSDP2: who records what, and a sharded posterior read as one
collect     when to collect and how to resume: what the training-loop callbacks share
"""

from nvmlib.nn.multiswag import MultiSWAG
from nvmlib.nn.swag import SWAG

__all__ = ["SWAG", "MultiSWAG"]
