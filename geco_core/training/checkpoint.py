"""The checkpoint format (``checkpoints/latest.pt``): what it holds, how it is read, and the one
check that keeps NaN and infinity out of it.

A checkpoint is a dict of tensors and plain values (``torch.save``), read back without unpickling
arbitrary objects (``weights_only=True``)::

    format     CHECKPOINT_FORMAT
    step       the step it was taken after
    model, objective (GECO's multipliers and moving averages), optimizer: their state_dicts
    rng        the RNG states of this process; rng_ranks: every process's, when several trained

:meth:`Experiment.state_dict <geco_core.training.experiment.Experiment.state_dict>` builds it,
:meth:`Run.save_checkpoint <geco_core.training.run.Run.save_checkpoint>` writes it atomically.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from geco_core.errors import CheckpointError

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "nonfinite_entries", "nonfinite_weights"]

CHECKPOINT_FORMAT = 1
#: the parts of a checkpoint that training changes, and must be finite
WEIGHTS = ("model", "objective", "optimizer")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects; a clear error if it is unreadable."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain values; geco never loads those "
            "(a checkpoint geco wrote holds none: this file is not one)"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {reason}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a geco checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def nonfinite_entries(state: Any) -> list[str]:
    """The keys of floating-point tensors in a nested state that hold NaN or infinity. One host
    read: every tensor's 2-norm at once (finite only if every entry is), then an exact check of the
    few whose norm is not (a norm can overflow where no entry does)."""
    leaves = dict(_float_leaves(state))
    if not leaves:
        return []
    norms = torch._foreach_norm(list(leaves.values()))
    suspect = torch.stack([n.float().to(norms[0].device) for n in norms]).isfinite().logical_not().tolist()
    return [k for (k, v), bad in zip(leaves.items(), suspect) if bad and not bool(torch.isfinite(v).all())]


def _float_leaves(state: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(state, torch.Tensor):
        if state.is_floating_point():
            yield prefix, state.detach()
    elif isinstance(state, dict):
        for key, v in state.items():
            yield from _float_leaves(v, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, list | tuple):
        for i, v in enumerate(state):
            yield from _float_leaves(v, f"{prefix}[{i}]")


def nonfinite_weights(state: dict[str, Any]) -> list[str]:
    """The tensors of a checkpoint's model, objective and optimiser states that hold NaN or
    infinity (:func:`nonfinite_entries`): a checkpoint with any is never written."""
    return nonfinite_entries({k: state[k] for k in WEIGHTS if k in state})
