"""The one place torchvision and timm are imported: ``from geco_core.compat import torchvision``.

PyPI's torchvision wheels are CUDA builds; on a CPU-only torch their compiled ops fail to load and
``import torchvision`` raises ``operator torchvision::nms does not exist``. Declaring the two op
schemas torchvision's Python code looks up at import time lets it load; ``ops.nms`` and
``io.read_image`` stay unavailable, and geco uses neither. Where torchvision loads normally this
does nothing.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

__all__ = ["torchvision", "import_timm"]

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: torch.library.Library | None = None  # kept alive: the schemas vanish with it


def _import() -> ModuleType:
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


torchvision = _import()


def import_timm() -> ModuleType:
    """timm imports torchvision, so it is imported here, after the fix above (and only on demand:
    importing timm takes a second or two)."""
    import timm

    return timm
