"""Under torch.distributed, GECO averages c_hat over processes: two gloo processes that each see half
of every batch follow the same lambda trajectory (and parameters) as one process with whole batches."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from geco_core import GECO, Batch, create_constraint

STEPS, BATCH, DIM, LATENT = 12, 8, 6, 2


class TinyVAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(DIM, 2 * LATENT)
        self.decoder = nn.Linear(LATENT, DIM)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_var = self.encoder(x.flatten(1)).chunk(2, dim=1)
        z = mu + (0.5 * log_var).exp() * eps
        kl = 0.5 * (mu.square() + log_var.exp() - 1 - log_var).sum(1)
        return torch.sigmoid(self.decoder(z)).view_as(x), kl


def train(rank: int, world: int, distributed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Lambda after every step, and the final parameters; rank ``r`` of ``world`` sees its slice."""
    torch.manual_seed(0)
    model = TinyVAE().double()
    if world > 1 and distributed:
        model = DistributedDataParallel(model)
    geco = GECO([create_constraint("test-mae", kappa=0.2)], controller="paper", alpha=0.9, lr=5.0, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    data = torch.Generator().manual_seed(1)
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    trajectory = []
    for _ in range(STEPS):
        x = torch.rand(BATCH, 1, 2, 3, generator=data, dtype=torch.float64)[part]
        eps = torch.randn(BATCH, LATENT, generator=data, dtype=torch.float64)[part]
        x_hat, kl = model(x, eps)
        loss = geco(kl, Batch(x=x, x_hat=x_hat))
        opt.zero_grad()
        loss.backward()
        opt.step()
        trajectory.append(geco.lambdas.clone())
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return torch.cat(trajectory), params


def _worker(rank: int, world: int, store: str, out: str) -> None:
    from geco_core.training.distributed import exit_process

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save(train(rank, world), f"{out}.{rank}")
        dist.barrier()  # leave together
    finally:
        dist.destroy_process_group()
    exit_process(0)  # as geco's own processes do: no interpreter finalisation with gloo around


def test_two_gloo_processes_with_half_batches_match_one_process(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    single_lambdas, single_params = train(0, 1)
    assert not torch.allclose(single_lambdas, torch.ones_like(single_lambdas))  # lambda did move
    for rank in range(2):
        lambdas, params = torch.load(f"{out}.{rank}", weights_only=True)
        torch.testing.assert_close(lambdas, single_lambdas, rtol=1e-10, atol=0)
        torch.testing.assert_close(params, single_params, rtol=1e-10, atol=1e-12)


def test_without_sync_each_process_follows_its_own_half():
    """The control: a process that does not average sees a different c_hat, so its lambda differs."""
    whole, _ = train(0, 1)
    half, _ = train(0, 2, distributed=False)  # rank 0's half alone
    assert not torch.allclose(whole, half)
