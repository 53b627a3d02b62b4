"""The one place torchvision, timm and torchmetrics (which imports torchvision) are imported:
:func:`import_torchvision`, :func:`import_timm`, :func:`import_torchmetrics_fid`.

Public, for plugins too. PyPI's torchvision wheels are CUDA builds; on a CPU-only torch their
compiled ops fail to load and ``import torchvision`` raises ``operator torchvision::nms does not
exist``. Declaring the two op schemas torchvision's Python code looks up at import time lets it load;
``ops.nms`` and ``io.read_image`` stay unavailable, and geco uses neither. Where torchvision loads
normally this does nothing. Both imports take a second or more, so call these only when something
that needs them is built.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType

import torch

__all__ = ["import_torchvision", "import_timm", "import_torchmetrics_fid"]

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: torch.library.Library | None = None  # kept alive: the schemas vanish with it


@functools.cache
def import_torchvision() -> ModuleType:
    """``torchvision``, importable next to a CPU-only torch."""
    global _library
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _library = torch.library.Library("torchvision", "DEF")  # noqa: TOR - schema only
        for schema in _SCHEMAS:
            _library.define(schema)
        import torchvision
    return torchvision


def import_timm() -> ModuleType:
    """``timm``, after :func:`import_torchvision` (timm imports torchvision)."""
    import_torchvision()
    import timm

    return timm


def import_torchmetrics_fid() -> ModuleType:
    """``torchmetrics.image.fid``, after :func:`import_torchvision` (torchmetrics imports it). Its
    ``FrechetInceptionDistance`` takes a feature network of ours without torch-fidelity."""
    import_torchvision()
    import torchmetrics.image.fid

    return torchmetrics.image.fid
