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

    L.Trainer(callbacks=[GecoCallback()], ...).fit(LitVAE(), loader)

Then the multipliers, moving averages and step count are buffers of the module, so they are in
Lightning's checkpoints (with their component names) and resume with them; under Lightning's DDP
strategy every process's ``training_step`` runs GECO, which averages the constraint over the
processes before its moving average, so all hold the same lambda; the callback logs every
component's ``c_hat``, ``c_ma``, ``lambda`` and ``beta`` through Lightning's logger, and after each
optimiser step lets the optimiser follow a multiplier restart (:meth:`GECO.follow`).
"""

from __future__ import annotations

from typing import Any

from geco_core import GECO
from geco_core.compat import import_torchvision

import_torchvision()  # lightning imports torchmetrics, which imports torchvision: load it the safe way first

import lightning as L  # noqa: E402

__all__ = ["GecoCallback"]


class GecoCallback(L.Callback):
    """Logs the GECO held as ``pl_module.<attribute>`` at the trainer's ``log_every_n_steps`` (keys
    ``geco/<component>/<c_hat|c_ma|lambda|beta>`` and the controller's), and after each optimiser
    step lets the optimisers follow a multiplier restart."""

    def __init__(self, attribute: str = "geco") -> None:
        super().__init__()
        self.attribute = attribute

    def geco(self, pl_module: L.LightningModule) -> GECO:
        geco = getattr(pl_module, self.attribute, None)
        if not isinstance(geco, GECO):
            raise AttributeError(f"GecoCallback: the LightningModule has no GECO as .{self.attribute}")
        return geco

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        geco = self.geco(pl_module)
        for optimizer in trainer.optimizers:
            geco.follow(optimizer)
        if trainer.global_step % trainer.log_every_n_steps == 0:
            report = {f"geco/{k}": v for k, v in geco.report().items()}
            pl_module.log_dict(report, on_step=True, on_epoch=False, rank_zero_only=True)
