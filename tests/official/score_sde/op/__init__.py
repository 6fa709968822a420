# PATCH(invdiff): upstream also imports the fused_act CUDA extension (unused by the models copied here)
from .upfirdn2d import upfirdn2d
