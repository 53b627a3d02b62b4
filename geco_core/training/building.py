"""What a config builds: data, model (its contract checked), constraints, objective and optimiser,
on the machine :func:`~geco_core.training.machine.prepare_device` sets up: an
:class:`~geco_core.training.experiment.Experiment`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from geco_core.data.base import Batches, ImageData
from geco_core.errors import ConfigError
from geco_core.models.base import VAE
from geco_core.plugins import create, registry
from geco_core.training.config import Config, ConstraintConfig
from geco_core.training.distributed import DataParallelGroup, ModelAndObjective
from geco_core.training.experiment import Experiment, evaluating, load_dataset
from geco_core.training.machine import prepare_device
from geco_core.training.objectives import Objective

__all__ = ["build", "check_model", "adam"]


def _model(config: Config, data: ImageData) -> VAE:
    """The configured model, sized for ``data`` (and conditioned on its context, if any)."""
    name = config.model.name
    entry = registry().get("model", name)
    kwargs: dict[str, Any] = {"image_shape": data.image_shape}
    if "data_mean" in entry.parameters():  # named, not **kwargs; computed only if the model uses it
        kwargs["data_mean"] = data.mean_image
    if data.context_shape is not None:
        if not entry.accepts("context_shape"):
            raise ConfigError(f"model.name: {name!r} is unconditional but dataset {config.data.name!r} has a context")
        kwargs["context_shape"] = data.context_shape
    elif getattr(entry.factory, "conditional", False):
        raise ConfigError(f"model.name: {name!r} is conditional but dataset {config.data.name!r} has no context")
    model = create("model", name, **kwargs, **config.model.options)
    check_model(model, data, name)
    return model


def check_model(model: Any, data: ImageData, name: str) -> None:
    """The model contract (docs/models.md), checked on two of ``data``'s examples: an ``nn.Module``
    with ``sample(n, context=None)``, whose ``forward(x, context=None)`` returns an ``Output`` of
    logits shaped like ``x`` and a per-example KL ``(B,)``; a ConfigError naming what is wrong. The
    check draws no random numbers the run would see and leaves the model's mode as it was."""
    where = f"model.name: model {name!r}"
    missing = [m for m in ("forward", "sample") if not callable(getattr(model, m, None))]
    if not isinstance(model, nn.Module) or missing:
        lacks = ", ".join(["subclass torch.nn.Module"] * (not isinstance(model, nn.Module)) + missing)
        raise ConfigError(f"{where} does not meet the model contract: it lacks {lacks} (subclass geco_core.models.VAE)")
    with torch.random.fork_rng(devices=[]), evaluating(model):  # draws and modes as they were after
        batch = data.batch(torch.arange(min(2, len(data))), torch.device("cpu"))
        out = model(batch.x, batch.context) if data.context_shape is not None else model(batch.x)
    logits, kl = getattr(out, "logits", None), getattr(out, "kl", None)
    n = len(batch.x)
    if (
        not isinstance(logits, Tensor)
        or logits.shape != batch.x.shape
        or not isinstance(kl, Tensor)
        or kl.shape != (n,)
    ):
        got = f"logits {tuple(getattr(logits, 'shape', ()))}, kl {tuple(getattr(kl, 'shape', ()))}"
        raise ConfigError(
            f"{where}: forward must return Output(logits {tuple(batch.x.shape)}, kl ({n},)) (nats per example); "
            f"got {type(out).__name__} with {got}"
        )


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


def build(
    config: Config, device: str | torch.device | None = None, group: DataParallelGroup | None = None
) -> Experiment:
    """Seed, then build data, model, constraints, objective and optimiser from ``config`` (for this
    process of ``group``, when several train together), on the machine :func:`prepare_device` sets up."""
    group = group or DataParallelGroup()
    group.check_batch(config.train.batch_size)
    local_rank = group.local_rank if group.distributed else None
    dev = prepare_device(config.train.device if device is None else str(device), config.train.threads, local_rank)
    torch.manual_seed(config.train.seed)
    with _named("data"):
        data = load_dataset(config, "train")
    validation = None
    if config.train.validation:
        data, validation = data.split(min(config.train.validation, len(data) // 10), config.data.seed)
    with _named("model"):
        model = _model(config, data).to(dev)
    constraints = []
    for i, spec in enumerate(config.constraints):
        with _named(f"constraints[{i}]"):
            constraints.append(_constraint(spec, data.image_shape).to(dev))
    with _named("objective"):
        objective = _objective(config, constraints).to(dev)
    params = [p for p in [*model.parameters(), *objective.parameters()] if p.requires_grad]
    if dev.type == "cuda" and _fits(data, validation, dev):  # index on the device: no copy per step
        data = data.to(dev)
        validation = validation.to(dev) if validation is not None else None
    batches = Batches(len(data), config.train.batch_size, config.train.seed, str(dev))
    optimizer = adam(params, config.train.lr)
    exp = Experiment(config, dev, data, model, constraints, objective, optimizer, batches, group, validation)
    if config.train.compile:
        stuck = [c.name for c in constraints if not getattr(c, "compilable", True)]
        if stuck:
            raise ConfigError(
                f"train.compile: constraint {stuck[0]!r} cannot be compiled as it is configured (see its options)"
            )
        if group.distributed:  # DistributedDataParallel splits the graph at its buckets: the model alone
            model.compile()
        else:
            exp.compiled = torch.compile(exp.eager_loss, fullgraph=True)
    if group.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [dev.index] if dev.type == "cuda" else None
        exp.ddp = DistributedDataParallel(
            ModelAndObjective(model, objective, exp.forward), device_ids=ids, broadcast_buffers=False
        )
        torch.manual_seed(config.train.seed * 1_000_003 + group.rank)  # each process draws its own noise
    return exp


def _fits(data: ImageData, validation: ImageData | None, device: torch.device) -> bool:
    """Whether the uint8 data take less than a quarter of the device's free memory."""
    held = [t for d in (data, validation) if d is not None for t in (d.images, d.labels, d.context) if t is not None]
    return sum(t.numel() * t.element_size() for t in held) < torch.cuda.mem_get_info(device)[0] / 4


def adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with torch's fused kernel (one kernel for all parameters; its speed-up is in
    docs/BENCHMARKS.md), else its multi-tensor version. Checkpoints of either load into the other."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(params, lr=lr, foreach=True)
