"""torch_xmc: group-shared fixed fan-in sparse output layers for extreme multi-label classification."""
from . import data, functional, grouping, memory, metrics, ops
from .headtail import HeadTailFanIn
from .modules import GroupSharedFanIn, random_indices
from .optim import SGDSR
from .rewire import Rewirer

__all__ = ["GroupSharedFanIn", "HeadTailFanIn", "Rewirer", "SGDSR", "data", "functional", "grouping", "memory",
           "metrics", "ops", "random_indices"]
__version__ = "0.1.0"
