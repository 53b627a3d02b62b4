"""Training on several processes (``torchrun``): the process group, the shard of each global batch,
and the few collectives the loop needs; what is global and what is each process's: docs/distributed.md."""

from __future__ import annotations

import datetime
import gc
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import attrs
import torch
import torch.distributed as dist
from torch import Tensor, nn

from geco_core.data.base import DataBatch
from geco_core.errors import ConfigError
from geco_core.models.base import Output

__all__ = ["DataParallelGroup", "launched", "join_group", "leave_group", "exit_process", "ModelAndObjective"]


@attrs.frozen
class DataParallelGroup:
    """The processes that train together, seen from this one: its ``rank`` among ``world``
    (``local_rank`` on its node), and the few collectives the loop needs. One process alone is
    a group of one, where every collective returns its input."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Process 0, the one that writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, index: Tensor) -> Tensor:
        """This process's piece of a global batch of example indices."""
        if not self.distributed:
            return index
        return index.view(self.world, -1)[self.rank]

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise ConfigError(
                f"train.batch_size = {batch_size} does not divide into {self.world} processes: "
                "it is the global batch, shared equally"
            )

    def all_true(self, flag: Tensor) -> Tensor:
        """A scalar bool tensor, true on every process where it is true on all of them (an
        all-reduce on the device; no host sync)."""
        if not self.distributed:
            return flag
        value = flag.to(torch.int32).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return value[0].bool()

    def mean(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Scalar tensors averaged over the processes (each holds an equal piece of the batch)."""
        if not self.distributed or not values:
            return values
        stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
        dist.all_reduce(stacked)
        return dict(zip(values, stacked / self.world))

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (on every process)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj``, on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launched() -> DataParallelGroup:
    """This process's place in the group torchrun's environment describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``), joined or not; a group of one without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DataParallelGroup()
    return DataParallelGroup(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def join_group(device: str) -> DataParallelGroup:
    """Join the process group described by torchrun's environment (one process: nothing to join).
    ``device`` is ``train.device``; on CUDA each process takes the GPU ``LOCAL_RANK``."""
    group = launched()
    if not group.distributed:
        return group
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(group.local_rank)
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    return attrs.evolve(group, world=dist.get_world_size())


def exit_process(code: int) -> NoReturn:
    """End a process of a distributed run, once it has left its group: flush what it printed and
    exit without finalising the interpreter. Finalisation would destroy whatever of gloo Python
    still references (a process group or its work, kept by an object in a reference cycle) while
    the interpreter is torn down; gloo's threads then wait for the GIL that finalisation holds and
    the process aborts with SIGABRT ("terminate called without an active exception") after a run
    that finished (the mechanism of pytorch/pytorch#179291). Everything geco writes is closed by
    then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def leave_group() -> None:
    """Leave the process group (at the end of ``geco train`` / ``resume``)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # DDP wrappers left in reference cycles let go of the group while it is alive
        dist.destroy_process_group()


class ModelAndObjective(nn.Module):
    """The model and the objective as one module, which DistributedDataParallel wraps, so that
    every trainable parameter (the model's, a learned sigma) has its gradient averaged.
    ``forward(batch, step) -> (loss, output)``; ``run_model(batch) -> output`` runs the model."""

    def __init__(self, model: nn.Module, objective: nn.Module, run_model: Callable[[DataBatch], Output]) -> None:
        super().__init__()
        self.model, self.objective, self.run_model = model, objective, run_model

    def forward(self, batch: DataBatch, step: int) -> tuple[Tensor, Output]:
        out = self.run_model(batch)
        return self.objective(out, batch, step), out
