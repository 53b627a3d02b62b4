"""The runtime of a run (an :class:`Experiment`: data, model, constraints, objective and optimiser
as :func:`~geco_core.training.building.build` made them; the loss, validation, checkpoint state) and
its full-data passes (:func:`passes`, :class:`PassMeasures`, held-out evaluation)."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from geco_core.constraint import ConstraintStack
from geco_core.data.base import Batches, DataBatch, ImageData
from geco_core.errors import CheckpointError, ConfigError, DataError
from geco_core.geco import GECO
from geco_core.models.base import VAE, Output
from geco_core.plugins import registry
from geco_core.training.checkpoint import CHECKPOINT_FORMAT
from geco_core.training.config import Config
from geco_core.training.distributed import DataParallelGroup
from geco_core.training.objectives import Objective, constraint_batch
from geco_core.training.rng import restore_rng, rng_state, seeded

__all__ = ["Experiment", "PassMeasures", "load_dataset", "evaluating", "evaluate_heldout", "passes"]


def load_dataset(config: Config, split: str) -> ImageData:
    """The configured dataset's ``split``, built by its registered factory."""
    entry = registry().get("dataset", config.data.name)
    given = {"root": config.data.root, "split": split, "seed": config.data.seed, "download": config.data.download}
    kwargs = {k: v for k, v in given.items() if entry.accepts(k)}
    return entry.factory(**kwargs, **config.data.options)


@attrs.define
class Experiment:
    """Everything a config builds: data, model, constraints, objective, optimiser."""

    config: Config
    device: torch.device
    data: ImageData
    model: VAE
    constraints: list[nn.Module]
    objective: Objective
    optimizer: torch.optim.Optimizer
    batches: Batches
    group: DataParallelGroup = attrs.field(factory=DataParallelGroup)
    validation: ImageData | None = None  # held out of the training data: GECO's generalisation gap
    compiled: Callable[[DataBatch, int], tuple[Tensor, Output]] | None = None  # the step's loss, compiled
    ddp: nn.Module | None = None  # model and objective in DistributedDataParallel, on several processes

    @property
    def geco(self) -> GECO | None:
        """The objective's multipliers, if it enforces constraints."""
        return self.objective.geco

    @functools.cached_property
    def stack(self) -> ConstraintStack | None:
        """The configured constraints (enforced by GECO, or only measured by other objectives)."""
        if self.geco is not None:
            return self.geco.stack
        return ConstraintStack(self.constraints) if self.constraints else None

    @functools.cached_property
    def heldout(self) -> tuple[str, ImageData]:
        """``(split, data)``: the dataset's test split; a :class:`DataError` naming what is missing
        where it cannot be loaded (no silent fallback to the training data)."""
        try:
            return "test", load_dataset(self.config, "test")
        except (ConfigError, DataError) as exc:
            raise DataError(
                f"data: the held-out (test) split of {self.config.data.name!r} cannot be loaded ({exc}); "
                "set logging.eval_examples = 0 and logging.plots = false to train without it"
            ) from None

    @functools.cached_property
    def judges(self) -> list[dict[str, nn.Module]]:
        """Each configured constraint's judges (:meth:`Constraint.judges`: the same constraint under
        networks that did not shape the reconstructions) on the device, by name; built when first
        asked for, without drawing from torch's random generator (a held-out pass's posterior draws
        are the same with judges or without)."""
        if self.stack is None:
            return []
        with torch.random.fork_rng(devices=[]):
            judges = [getattr(c, "judges", dict)() for c in self.stack.constraints]
        return [{k: j.to(self.device).eval() for k, j in group.items()} for group in judges]

    def forward(self, batch) -> Output:
        """The model's output in float32 (the model itself runs under autocast when bf16 is set)."""
        bf16 = self.config.train.precision == "bfloat16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = self.model(batch.x, batch.context)
        return Output(out.logits.float(), out.kl.float()) if bf16 else out

    def loss(self, batch: DataBatch, step: int) -> tuple[Tensor, Output]:
        """The objective's loss on ``batch`` and the model's output: through DistributedDataParallel
        when there are several processes, compiled whole (model, objective, GECO, constraints) when
        ``train.compile`` is set."""
        if self.ddp is not None:
            return self.ddp(batch, step)
        if self.compiled is not None:
            return self.compiled(batch, step)
        return self.eager_loss(batch, step)

    def eager_loss(self, batch: DataBatch, step: int) -> tuple[Tensor, Output]:
        out = self.forward(batch)
        return self.objective(out, batch, step), out

    def validate(self, step: int) -> None:
        """Measure every constraint on the validation split (this process's share of it, with
        draws of its own seed, so that training's noise is untouched) and hand the means to GECO,
        which keeps the generalisation gap (:meth:`GECO.validate`)."""
        if self.geco is None or self.validation is None:
            return
        index = torch.arange(self.group.rank, len(self.validation), self.group.world)
        with seeded(self.device, self.config.train.seed * 1_000_003 + step):
            self.geco.validate(constraint_values(self, self.validation, index))

    def state_dict(self, step: int) -> dict[str, Any]:
        """Everything a resume needs; with several processes every one's RNG state (a collective:
        every process calls it)."""
        rng = rng_state(self.device)
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
        }
        if self.group.distributed:
            state["rng_ranks"] = self.group.gather(rng)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> int:
        """Restore a checkpoint's states; returns its step."""
        try:
            self.model.load_state_dict(state["model"])
            self.objective.load_state_dict(state["objective"])
            self.optimizer.load_state_dict(state["optimizer"])
            seed = self.config.train.seed * 1_000_003 + self.group.rank + int(state["step"])
            restore_rng(state.get("rng_ranks") or [state["rng"]], self.group.rank, seed, self.device)
            return int(state["step"])
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint does not fit this run's config: {str(exc).splitlines()[0]}") from None


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; the previous modes restored after."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def passes(
    exp: Experiment, data: ImageData, index: Tensor, batch_size: int = 500
) -> Iterator[tuple[DataBatch, Output]]:
    """One pass over the examples ``index`` of ``data``: ``(batch, output)`` per batch, one forward
    (one posterior draw per example) in eval mode without gradients; the modes are restored after."""
    with evaluating(exp.model, exp.objective, *exp.constraints):
        for start in range(0, len(index), batch_size):
            batch = data.batch(index[start : start + batch_size], exp.device)
            yield batch, exp.forward(batch)


class PassMeasures:
    """What a pass measures, batch by batch (:meth:`add`): each example's constraint values
    (``values``, ``(n, L)``) and KL (``kl``, ``(n,)``, nats), the sums of KL and squared pixel error
    (float64), and for a held-out report (``report=True``) each constraint's value on the data
    themselves (the examples as their own reconstructions: what the data reach under a learned
    constraint's network) and, where constraints have judges (:attr:`Experiment.judges`), each
    judge's sums."""

    def __init__(self, exp: Experiment, report: bool = True) -> None:
        self.exp, self.n, self.report = exp, 0, report and exp.stack is not None
        self.sums = torch.zeros(2, dtype=torch.float64, device=exp.device)  # KL, mean squared error
        self.judges = exp.judges if self.report and any(exp.judges) else []
        self.judge_sums = [
            {k: torch.zeros(c.dim, device=exp.device) for k in group}
            for c, group in zip(exp.stack.constraints if self.judges else (), self.judges)
        ]
        self.data_sums = torch.zeros(exp.stack.num_components if self.report else 0, device=exp.device)
        self._values: list[Tensor] = []
        self._kl: list[Tensor] = []

    def measure(self, data: ImageData, index: Tensor, batch_size: int = 500) -> PassMeasures:
        """Add one pass (:func:`passes`) over the examples ``index`` of ``data``; returns itself."""
        for batch, out in passes(self.exp, data, index, batch_size):
            self.add(batch, out)
        return self

    def add(self, batch: DataBatch, out: Output) -> None:
        self.n += len(batch.x)
        self.sums[0] += out.kl.double().sum()
        self.sums[1] += (batch.x - out.x_hat).square().flatten(1).mean(1).double().sum()
        self._kl.append(out.kl)
        if self.exp.stack is not None:
            cbatch = constraint_batch(out, batch)
            for group, sums in zip(self.judges, self.judge_sums):
                for name, judge in group.items():
                    sums[name] += judge(cbatch).sum(0).float()
            self._values.append(self.exp.stack.evaluate(cbatch).float())
            if self.report:
                self.data_sums += self.exp.stack.evaluate(attrs.evolve(cbatch, x_hat=batch.x)).sum(0).float()

    @property
    def values(self) -> Tensor:
        width = self.exp.stack.num_components if self.exp.stack is not None else 0
        return torch.cat(self._values) if self._values else torch.zeros(0, width, device=self.exp.device)

    @property
    def kl(self) -> Tensor:
        return torch.cat(self._kl)

    def result(self) -> dict[str, Any]:
        """Mean KL (nats), pixel RMSE, each constraint's mean value (``constraint_means``, ``(L,)``)
        and on the data themselves (``data_means``), and with judges each constraint's mean under
        each judge (``judge_means``: per constraint, judge name -> ``(dim,)``)."""
        kl, sq = self.sums.tolist()
        n = self.n
        result: dict[str, Any] = {"examples": n, "kl": kl / n, "rmse": math.sqrt(sq / n)}
        if self.exp.stack is not None:
            result["constraint_means"] = self.values.mean(0).cpu()
        if self.report:
            result["data_means"] = (self.data_sums / n).cpu()
        if self.judges:
            result["judge_means"] = [{k: (total / n).cpu() for k, total in sums.items()} for sums in self.judge_sums]
        return result


def constraint_values(exp: Experiment, data: ImageData, index: Tensor, batch_size: int = 500) -> Tensor:
    """Every constraint component's value for the examples ``index`` of ``data`` (``(n, L)``, on the
    device), from one pass (:func:`passes`)."""
    return PassMeasures(exp, report=False).measure(data, index, batch_size).values


def evaluate_heldout(exp: Experiment, data: ImageData, n: int, batch_size: int = 500) -> dict[str, Any]:
    """:meth:`PassMeasures.result` of one pass over the first ``n`` examples of ``data``."""
    return PassMeasures(exp).measure(data, torch.arange(min(n, len(data))), batch_size).result()
