r"""Forward models of invdiff: deepinv physics and a registry of named tasks.

>>> from invdiff import operators
>>> physics = operators.make("ct-sparse-30", (1, 64, 64))
>>> operators.available()[:3]
['deblur-gauss', 'deblur-motion', 'deblur-blind']

See :func:`make` for the task list, noise conventions and the ``physics.task`` record.
"""

from .ct import FanBeamCT, ParallelBeamCT, ramp_filter
from .mri import (
    MultiCoilMRIOperator,
    SingleCoilMRI,
    birdcage_coil_maps,
    cartesian_mask,
    normalize_coil_maps,
)
from .natural import ClosedFormDownsampling, WienerBlurFFT
from .phase_retrieval import FourierPhaseRetrieval
from .registry import (
    TASK_EXAMPLES,
    OperatorInfo,
    available,
    describe,
    make,
    operator_info,
    task_info,
)
from .stacked import WhitenedStack, whitened_stack
from .volume import Cartesian3DMRI, SliceAveraging, SliceStack, phase_encode_mask

__all__ = [
    "make",
    "available",
    "describe",
    "task_info",
    "operator_info",
    "OperatorInfo",
    "TASK_EXAMPLES",
    "ParallelBeamCT",
    "FanBeamCT",
    "ramp_filter",
    "SingleCoilMRI",
    "MultiCoilMRIOperator",
    "cartesian_mask",
    "birdcage_coil_maps",
    "normalize_coil_maps",
    "WienerBlurFFT",
    "ClosedFormDownsampling",
    "FourierPhaseRetrieval",
    "WhitenedStack",
    "whitened_stack",
    "SliceStack",
    "Cartesian3DMRI",
    "SliceAveraging",
    "phase_encode_mask",
]
