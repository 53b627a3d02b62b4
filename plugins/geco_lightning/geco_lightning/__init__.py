"""GECO inside PyTorch Lightning.

Hold a :class:`geco_core.GECO` as a submodule of your ``LightningModule`` and return its loss from
``training_step``; add :class:`GecoCallback` to the ``Trainer``::

    class LitVAE(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = MLPVAE((1, 28, 28))
            self.geco = GECO([create_constraint("re", kappa=0.1, image_shape=(1, 28, 28))], alpha=0.9)

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self.model(x)
            loss = self.geco(out.kl, Batch(x=x, x_hat=out.x_hat, labels=y))
            return loss if torch.isfinite(loss) else None  # None: Lightning skips the step

        def validation_step(self, batch, batch_idx):  # for held-out kappa and the finder
            x, y = batch
            out = self.model(x)
            return {"constraint_values": self.geco.evaluate(Batch(x=x, x_hat=out.x_hat, labels=y)), "kl": out.kl}

    L.Trainer(callbacks=[GecoCallback()], ...).fit(LitVAE(), loader, val_loader)
    result = find_kappa(LitVAE(), loader, val_loader, steps=2000)  # which kappa, at what KL

Then the multipliers, moving averages and step count are buffers of the module, so they are in
Lightning's checkpoints (with their component names) and resume with them; under Lightning's DDP
strategy every process's ``training_step`` runs GECO, which averages the constraint over the
processes before its moving average, so all hold the same lambda; the callback logs every
component's ``c_hat``, ``c_ma``, ``lambda`` and ``beta`` through Lightning's logger, and after each
optimiser step lets the optimiser follow a multiplier restart (:meth:`GECO.follow`).

Held-out kappa: where ``validation_step`` returns the validation batch's constraint values (key
``constraint_values``, ``(B, L)``, from ``geco.evaluate``), the callback hands each validation
epoch's values to :meth:`GECO.validate`, which tightens GECO's target by the generalisation gap, as
``geco train`` does with its validation split. :func:`find_kappa` is ``geco find-kappa`` on a
``LightningModule`` (as ``Tuner.lr_find`` is the learning-rate finder): it needs the KL too (key
``kl``, ``(B,)`` nats).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from geco_core import GECO
from geco_core.compat import import_torchvision

import_torchvision()  # lightning imports torchmetrics, which imports torchvision: load it the safe way first

import lightning as L  # noqa: E402

from geco_core.evaluation.kappa import FINDER_STEPS, KappaFinder, KappaResult  # noqa: E402

__all__ = ["GecoCallback", "find_kappa", "VALUES", "KL"]

#: the keys of ``validation_step``'s output the callbacks read: constraint values ``(B, L)``, KL ``(B,)``
VALUES, KL = "constraint_values", "kl"


def _geco_of(pl_module: L.LightningModule, attribute: str) -> GECO:
    geco = getattr(pl_module, attribute, None)
    if not isinstance(geco, GECO):
        raise AttributeError(f"the LightningModule has no GECO as .{attribute}")
    return geco


class _ValidationOutputs(L.Callback):
    """Collects ``validation_step``'s outputs under ``keys`` over one validation epoch (not the
    sanity check) and hands them, concatenated, to ``measured(pl_module, *tensors)``."""

    def __init__(self, keys: tuple[str, ...], measured: Callable[..., None]) -> None:
        super().__init__()
        self.keys, self.measured = keys, measured

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._outputs: dict[str, list[torch.Tensor]] = {k: [] for k in self.keys}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(outputs, Mapping) and all(outputs.get(k) is not None for k in self.keys):
            for k in self.keys:
                self._outputs[k].append(outputs[k].detach())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and all(self._outputs.values()):
            self.measured(pl_module, *(torch.cat(self._outputs[k]) for k in self.keys))


class GecoCallback(_ValidationOutputs):
    """Logs the GECO held as ``pl_module.<attribute>`` at the trainer's ``log_every_n_steps`` (keys
    ``geco/<component>/<c_hat|c_ma|lambda|beta>`` and the controller's), after each optimiser step
    lets the optimisers follow a multiplier restart, and after each validation epoch hands the
    constraint values ``validation_step`` returned (key :data:`VALUES`) to :meth:`GECO.validate`
    (held-out kappa; nothing where it returns none)."""

    def __init__(self, attribute: str = "geco") -> None:
        super().__init__((VALUES,), lambda pl_module, values: self.geco(pl_module).validate(values))
        self.attribute = attribute

    def geco(self, pl_module: L.LightningModule) -> GECO:
        return _geco_of(pl_module, self.attribute)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        geco = self.geco(pl_module)
        for optimizer in trainer.optimizers:
            geco.follow(optimizer)
        if trainer.global_step % trainer.log_every_n_steps == 0:
            report = {f"geco/{k}": v for k, v in geco.state().flat().items()}
            pl_module.log_dict(report, on_step=True, on_epoch=False, rank_zero_only=True)


def find_kappa(
    module: L.LightningModule,
    train_dataloaders: Any,
    val_dataloaders: Any,
    *,
    steps: int = FINDER_STEPS,
    budget: int | None = None,
    attribute: str = "geco",
    folder: str | Path | None = None,
    **trainer_options: Any,
) -> KappaResult:
    """``geco find-kappa`` for a ``LightningModule`` holding a GECO as ``.<attribute>``: ``steps``
    training steps with the finder's lambda ramp as GECO's controller, the validation loader
    measured every ``steps / 40`` of them (``validation_step`` returns :data:`VALUES` and
    :data:`KL`; keep it the same examples, with no shuffling), then the module's weights and GECO's
    state put back as they were. Returns the result (``predict_kl``, ``suggestion``, ``table``,
    ``plot``; also saved in ``folder`` if given) for runs of ``budget`` steps (default ``steps``).
    ``trainer_options`` go to the ``Trainer`` (``accelerator``, ``precision``, ...); one process."""
    finder = KappaFinder(_geco_of(module, attribute), steps, budget)
    options = {
        "max_steps": steps,
        "val_check_interval": finder.every,
        "check_val_every_n_epoch": None,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **trainer_options,
    }
    weights = copy.deepcopy(module.state_dict())
    try:
        with finder:
            probe = _ValidationOutputs(
                (VALUES, KL), lambda _, values, kl: finder.probe(int(finder.geco.step), values, kl)
            )
            L.Trainer(callbacks=[probe], **options).fit(module, train_dataloaders, val_dataloaders)
    finally:
        module.load_state_dict(weights)
    return finder.result(folder)
