"""modulart.patcher: Transformer-Patcher — fix mistakes one after another with a few trained neurons.

Each mistake gets one neuron (a key, a bias and a value; gate + up keys for gated FFNs) added to an
FFN through hooks, trained to fire on the mistaken input and stay silent on a memory of ordinary
inputs (arXiv 2301.09785). Patches are typed, individually removable and switchable
(``remove_patch`` / ``disable_patch`` / ``enable_patch``), bakeable into a widened layer, and saved
with their provenance (``mt.load`` restores them).

Example:
    >>> import torch, modulart.patcher as mp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    >>> patcher = mp.apply(model, config=mp.PatcherConfig.reference("classification"))
    >>> type(patcher).__name__, patcher.patches
    ('PatcherHandle', [])
    >>> patcher.remove()
"""

from modulart.patcher.baseline import FineTuneEditor
from modulart.patcher.config import INITS, POSITIONS, TASKS, PatcherConfig
from modulart.patcher.handle import PatcherHandle
from modulart.patcher.operator import Patcher, PatcherPlan, apply, load
from modulart.patcher.protocol import EditCase, Editor, SequentialReport, sequential_edit
from modulart.patcher.records import EditResult, FiringReport, Patch

__all__ = [
    "INITS",
    "POSITIONS",
    "TASKS",
    "EditCase",
    "EditResult",
    "Editor",
    "FineTuneEditor",
    "FiringReport",
    "Patch",
    "Patcher",
    "PatcherConfig",
    "PatcherHandle",
    "PatcherPlan",
    "SequentialReport",
    "apply",
    "load",
    "sequential_edit",
]
