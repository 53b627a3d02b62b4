"""A GECO VAE in PyTorch Lightning, end to end (the README's example, runnable)::

    python -m geco_lightning.example --devices 2 --epochs 2 --out runs/lightning

An MLP VAE on a fixed set of random images, GECO with one constraint; Lightning's CSV logger and
checkpoints under ``--out``; ``--resume CKPT`` continues from a checkpoint. Prints the final
multipliers as one JSON line (process 0 only).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from geco_core import GECO, Batch, create_constraint
from geco_core.models import MLPVAE
from geco_lightning import KL, VALUES, GecoCallback, L

SHAPE = (1, 8, 8)


class LitVAE(L.LightningModule):
    """An MLP VAE trained with GECO; ``sample = False`` decodes the posterior mean (no noise)."""

    def __init__(self, constraint: str = "re", kappa: float = 0.2, lr: float = 1e-3, sample: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = MLPVAE(SHAPE, latent_dim=4, hidden=(32,))
        self.geco = GECO([create_constraint(constraint, kappa=kappa, image_shape=SHAPE)], alpha=0.9)

    def forward(self, x):
        """Per-example KL (nats) and the reconstruction mean."""
        q = self.model.posterior(x)
        z = q.rsample() if self.hparams.sample else q.mu
        return q.kl_standard_normal(), torch.sigmoid(self.model.decoder(z))

    def training_step(self, batch, batch_idx):
        x, y = batch
        kl, x_hat = self(x)
        loss = self.geco(kl, Batch(x=x, x_hat=x_hat, labels=y))
        return loss if torch.isfinite(loss) else None  # None: Lightning skips the optimiser step

    def validation_step(self, batch, batch_idx):
        """The constraint values and KL of held-out examples: GecoCallback's held-out kappa and
        find_kappa's probe read them."""
        x, y = batch
        kl, x_hat = self(x)
        return {VALUES: self.geco.evaluate(Batch(x=x, x_hat=x_hat, labels=y)), KL: kl}

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.hparams.lr)


def data(n: int = 256, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.rand(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="the global batch, shared by the devices")
    p.add_argument("--constraint", default="re")
    p.add_argument("--kappa", type=float, default=0.2)
    p.add_argument("--no-sample", action="store_true", help="decode the posterior mean (deterministic)")
    p.add_argument(
        "--ordered",
        action="store_true",
        help="no shuffling: process r of N takes every N-th example from r, so that each global batch is "
        "the single-device one (Lightning's own distributed sampler shuffles)",
    )
    p.add_argument("--out", default="runs/lightning")
    p.add_argument("--resume", help="a Lightning checkpoint to continue from")
    args = p.parse_args(argv)
    L.seed_everything(0, workers=True)
    module = LitVAE(args.constraint, args.kappa, sample=not args.no_sample)
    dataset, sampler = data(), None
    if args.ordered and args.devices > 1:  # the launcher sets LOCAL_RANK in the processes it starts
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        sampler = torch.utils.data.DistributedSampler(dataset, args.devices, rank, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size // args.devices, sampler=sampler)
    trainer = L.Trainer(
        use_distributed_sampler=sampler is None,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        logger=L.pytorch.loggers.CSVLogger(args.out, name="", version=0),
        callbacks=[GecoCallback(), L.pytorch.callbacks.ModelCheckpoint(args.out, save_top_k=-1)],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(module, loader, ckpt_path=args.resume)
    if trainer.global_rank == 0:
        print(json.dumps({"step": trainer.global_step, **module.geco.state().flat()}))
    if trainer.world_size > 1:  # every process leaves the group, then exits without finalising
        from geco_core.training.distributed import exit_process, leave_group

        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            leave_group()
        exit_process(0)


if __name__ == "__main__":
    main()
