"""torch_xmc: group-shared fixed fan-in sparse output layers for extreme multi-label classification."""
from . import functional, ops
from .modules import GroupSharedFanIn, random_indices

__all__ = ["GroupSharedFanIn", "functional", "ops", "random_indices"]
__version__ = "0.1.0"
