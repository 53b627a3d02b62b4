"""What a config builds: data, model, constraints, objective and optimiser (an :class:`Experiment`),
and its evaluation on held-out data."""

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
from geco_core.plugins import create, registry
from geco_core.training.config import Config, ConstraintConfig
from geco_core.training.distributed import Processes
from geco_core.training.memory import free_cores, keep_freed_memory
from geco_core.training.objectives import Objective, constraint_batch
from geco_core.training.run import CHECKPOINT_FORMAT

__all__ = ["Experiment", "build", "load_dataset", "evaluating", "evaluate_heldout"]


def load_dataset(config: Config, split: str) -> ImageData:
    """The configured dataset's ``split``, built by its registered factory."""
    entry = registry().get("dataset", config.data.name)
    given = {"root": config.data.root, "split": split, "seed": config.data.seed, "download": config.data.download}
    kwargs = {k: v for k, v in given.items() if entry.accepts(k)}
    return entry.factory(**kwargs, **config.data.options)


def _device(name: str, processes: Processes) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but CUDA is not available on this machine")
    if name == "cuda" and processes.distributed:
        return torch.device("cuda", processes.local_rank)  # one GPU per process
    return torch.device(name)


def _model(config: Config, data: ImageData) -> VAE:
    """The configured model, sized for ``data`` (and conditioned on its context, if any)."""
    name = config.model.name
    entry = registry().get("model", name)
    kwargs: dict[str, Any] = {"image_shape": data.image_shape}
    if data.context_shape is not None:
        if not entry.accepts("context_shape"):
            raise ConfigError(f"model.name: {name!r} is unconditional but dataset {config.data.name!r} has a context")
        kwargs["context_shape"] = data.context_shape
    elif getattr(entry.factory, "conditional", False):
        raise ConfigError(f"model.name: {name!r} is conditional but dataset {config.data.name!r} has no context")
    return create("model", name, **kwargs, **config.model.options)


def _constraint(spec: ConstraintConfig, image_shape: tuple[int, int, int]) -> nn.Module:
    entry = registry().get("constraint", spec.name)
    extra = {"image_shape": image_shape} if entry.accepts("image_shape") else {}
    return create("constraint", spec.name, **extra, **spec.options)


def _objective(config: Config, constraints: list[nn.Module]) -> Objective:
    """The registered objective with its options; a constrained one gets the constraints, and the
    per-constraint ``lr`` / ``lambda_init`` of ``[[constraints]]`` as one value per constraint."""
    name, options = config.objective.name, dict(config.objective.options)
    entry = registry().get("objective", name)
    if getattr(entry.factory, "constrained", False):
        options["constraints"] = constraints
        for key in ("lr", "lambda_init"):
            given = [getattr(spec, key) for spec in config.constraints]
            if any(v is not None for v in given) and entry.accepts(key):
                default = options.get(key, entry.parameters()[key].default)
                options[key] = [default if v is None else v for v in given]
    return create("objective", name, **options)


@contextlib.contextmanager
def _named(section: str) -> Iterator[None]:
    """Prefix a factory's ConfigError with the config section it came from."""
    try:
        yield
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith(section) else f"{section}: {text}") from None


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
    processes: Processes = attrs.field(factory=Processes)
    compiled: nn.Module | None = None  # torch.compile(model), when train.compile is set
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
        """``(split, data)``: the test split where the dataset has one, else the training data."""
        try:
            return "test", load_dataset(self.config, "test")
        except (ConfigError, DataError):
            return "train", self.data

    def forward(self, batch) -> Output:
        """The model's output in float32 (the model itself runs under autocast when bf16 is set)."""
        bf16 = self.config.train.precision == "bfloat16"
        model = self.compiled if self.compiled is not None and self.model.training else self.model
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(batch.x, batch.context)
        return Output(out.logits.float(), out.kl.float()) if bf16 else out

    def loss(self, batch: DataBatch, step: int) -> tuple[Tensor, Output]:
        """The objective's loss on ``batch`` and the model's output (through DistributedDataParallel
        when there are several processes)."""
        if self.ddp is not None:
            return self.ddp(batch, step)
        out = self.forward(batch)
        return self.objective(out, batch, step), out

    def state_dict(self, step: int) -> dict[str, Any]:
        """Everything a resume needs; with several processes every one's RNG state (a collective:
        every process calls it)."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
        }
        if self.processes.distributed:
            state["rng_ranks"] = self.processes.gather(rng)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> int:
        """Restore a checkpoint's states; returns its step."""
        try:
            self.model.load_state_dict(state["model"])
            self.objective.load_state_dict(state["objective"])
            self.optimizer.load_state_dict(state["optimizer"])
            ranks = state.get("rng_ranks") or [state["rng"]]
            rank = self.processes.rank
            if rank < len(ranks):  # the same process of the run that wrote it
                rng = ranks[rank]
                torch.set_rng_state(rng["torch"])
                if "cuda" in rng and self.device.type == "cuda":
                    torch.cuda.set_rng_state(rng["cuda"], self.device)
            else:  # a process the checkpoint's run did not have: a seed of its own
                torch.manual_seed(self.config.train.seed * 1_000_003 + rank + int(state["step"]))
            return int(state["step"])
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint does not fit this run's config: {str(exc).splitlines()[0]}") from None


def build(config: Config, device: str | torch.device | None = None, processes: Processes | None = None) -> Experiment:
    """Seed, then build data, model, constraints, objective and optimiser from ``config`` (for this
    process of ``processes``, when several train together)."""
    processes = processes or Processes()
    processes.check_batch(config.train.batch_size)
    dev = _device(config.train.device, processes) if device is None else torch.device(device)
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    elif dev.type == "cpu" and (free := free_cores()) < torch.get_num_threads():
        torch.set_num_threads(free)  # threads on busy cores slow every step (BENCHMARKS.md, "Threads on a shared CPU")
    if dev.type == "cpu":
        keep_freed_memory()  # +10-16% images/s at batch >= 64 (docs/BENCHMARKS.md, "Image size and batch")
    torch.manual_seed(config.train.seed)
    with _named("data"):
        data = load_dataset(config, "train")
    with _named("model"):
        model = _model(config, data).to(dev)
    constraints = []
    for i, spec in enumerate(config.constraints):
        with _named(f"constraints[{i}]"):
            constraints.append(_constraint(spec, data.image_shape).to(dev))
    with _named("objective"):
        objective = _objective(config, constraints).to(dev)
    params = [p for p in [*model.parameters(), *objective.parameters()] if p.requires_grad]
    batches = Batches(len(data), config.train.batch_size, config.train.seed)
    exp = Experiment(
        config, dev, data, model, constraints, objective, adam(params, config.train.lr), batches, processes
    )
    if config.train.compile:
        exp.compiled = torch.compile(model)
    if processes.distributed:
        from torch.nn.parallel import DistributedDataParallel

        together = _Together(model, objective, exp.forward)
        ids = [dev.index] if dev.type == "cuda" else None
        exp.ddp = DistributedDataParallel(together, device_ids=ids, broadcast_buffers=False)
        torch.manual_seed(config.train.seed * 1_000_003 + processes.rank)  # each process draws its own noise
    return exp


class _Together(nn.Module):
    """The model and the objective as one module, what DistributedDataParallel wraps: every
    trainable parameter (the model's, a learned sigma) has its gradient averaged."""

    def __init__(self, model: VAE, objective: Objective, forward: Callable[[DataBatch], Output]) -> None:
        super().__init__()
        self.model, self.objective, self._forward = model, objective, forward

    def forward(self, batch: DataBatch, step: int) -> tuple[Tensor, Output]:
        out = self._forward(batch)
        return self.objective(out, batch, step), out


def adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with torch's fused kernel (one kernel for all parameters; its speed-up is in
    docs/BENCHMARKS.md), else its multi-tensor version. Checkpoints of either load into the other."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(params, lr=lr, foreach=True)


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


def evaluate_heldout(
    exp: Experiment,
    data: ImageData,
    n: int,
    batch_size: int = 500,
    on_batch: Callable[[DataBatch, Output], None] | None = None,
) -> dict[str, Any]:
    """Mean KL (nats), pixel RMSE and each constraint's mean value (``(L,)``) on the first ``n``
    examples of ``data``, one forward pass (one posterior draw) per batch; ``on_batch(batch, out)``
    sees each, for measures of the same pass."""
    n = min(n, len(data))
    kl = sq = 0.0
    values: list[Tensor] = []
    with evaluating(exp.model, exp.objective, *exp.constraints):
        for start in range(0, n, batch_size):
            batch = data.batch(torch.arange(start, min(n, start + batch_size)), exp.device)
            out = exp.forward(batch)
            if on_batch is not None:
                on_batch(batch, out)
            kl += float(out.kl.sum())
            sq += float((batch.x - out.x_hat).square().flatten(1).mean(1).sum())
            if exp.stack is not None:
                values.append(exp.stack.evaluate(constraint_batch(out, batch)).sum(0))
    result: dict[str, Any] = {"examples": n, "kl": kl / n, "rmse": math.sqrt(sq / n)}
    if values:
        result["constraint_means"] = (torch.stack(values).sum(0) / n).cpu()
    return result
