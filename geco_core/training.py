"""One trainer for every objective, and the run folder it writes.

A run folder holds::

    config.toml          the resolved config (every default written out)
    metrics.jsonl        one JSON line per logged step
    tb/                  the same metrics for TensorBoard
    checkpoints/latest.pt  model, optimiser, objective (GECO) and RNG states, written atomically
    summary.json         the final summary: held-out evaluation, each constraint against its kappa
    plots/               trajectory.png (the paper's Figure 1) and grid.png (data / recon / samples)

Resuming restores every state, including the RNG and the data order (a function of the step), so
N steps + resume + N steps equals 2N uninterrupted steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from geco_core.config import Config, ConstraintConfig, ObjectiveConfig, load_config
from geco_core.constraint import Batch, component_names
from geco_core.data.base import Batches, ImageData
from geco_core.errors import CheckpointError, ConfigError, DataError
from geco_core.geco import GECO
from geco_core.models.base import VAE, Output
from geco_core.objectives import ELBO, AnnealedBeta, Beta, GecoObjective, Likelihood, Objective
from geco_core.plugins import create, registry

__all__ = [
    "Experiment",
    "build",
    "load_dataset",
    "new_run_dir",
    "train",
    "resume",
    "evaluate_heldout",
    "heldout_split",
    "evaluating",
    "read_metrics",
    "load_checkpoint",
    "save_checkpoint",
    "write_atomic",
    "CHECKPOINT",
]

CHECKPOINT = Path("checkpoints") / "latest.pt"
CHECKPOINT_FORMAT = 1
MAX_LOGGED_COMPONENTS = 8  # a constraint with more components is logged as summary statistics


def load_dataset(config: Config, split: str) -> ImageData:
    """The configured dataset's ``split``, built by its registered factory."""
    entry = registry().get("dataset", config.data.name)
    given = {"root": config.data.root, "split": split, "seed": config.data.seed, "download": config.data.download}
    kwargs = {k: v for k, v in given.items() if entry.accepts(k)}
    return entry.factory(**kwargs, **config.data.options)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but CUDA is not available on this machine")
    return torch.device(name)


def build_model(config: Config, data: ImageData) -> VAE:
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


def build_constraint(spec: ConstraintConfig, image_shape: tuple[int, int, int]) -> nn.Module:
    entry = registry().get("constraint", spec.name)
    extra = {"image_shape": image_shape} if entry.accepts("image_shape") else {}
    return create("constraint", spec.name, **extra, **spec.options)


def build_objective(
    cfg: ObjectiveConfig, constraints: list[nn.Module], specs: tuple[ConstraintConfig, ...]
) -> Objective:
    if cfg.name == "geco":
        g = cfg.geco
        geco = GECO(
            constraints,
            alpha=g.alpha,
            lr=[s.lr if s.lr is not None else g.lr for s in specs],
            lambda_init=[s.lambda_init if s.lambda_init is not None else g.lambda_init for s in specs],
            lambda_min=g.lambda_min,
            lambda_max=g.lambda_max,
            ma_init=g.ma_init,
            warmup=g.warmup,
            strict=g.strict,
        )
        return GecoObjective(geco)
    likelihood = Likelihood(cfg.likelihood, cfg.sigma, cfg.learn_sigma)
    if cfg.name == "elbo":
        return ELBO(likelihood)
    if cfg.name == "beta":
        return Beta(likelihood, cfg.beta)
    return AnnealedBeta(likelihood, cfg.beta_start, cfg.beta_end, cfg.anneal_steps)


@attrs.define
class Experiment:
    """Everything a config builds: data, model, constraints, objective, optimiser; and one step."""

    config: Config
    device: torch.device
    data: ImageData
    model: VAE
    constraints: list[nn.Module]
    objective: Objective
    optimizer: torch.optim.Optimizer
    batches: Batches

    @property
    def geco(self) -> GECO | None:
        return getattr(self.objective, "geco", None)

    def forward(self, batch) -> Output:
        """The model's output in float32 (the model itself runs under autocast when bf16 is set)."""
        bf16 = self.config.train.precision == "bfloat16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = self.model(batch.x, batch.context)
        return Output(out.logits.float(), out.kl.float()) if bf16 else out

    def step(self, step: int) -> dict[str, Tensor]:
        """One optimisation step on training batch ``step``; returns detached metrics."""
        batch = self.data.batch(self.batches(step), self.device)
        loss, metrics = self.objective(self.forward(batch), batch, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.train.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        metrics["loss"] = loss.detach()
        return metrics

    def state_dict(self, step: int) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> int:
        """Restore a checkpoint's states; returns its step."""
        try:
            self.model.load_state_dict(state["model"])
            self.objective.load_state_dict(state["objective"])
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["torch"])
            if "cuda" in state["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
            return int(state["step"])
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint does not fit this run's config: {str(exc).splitlines()[0]}") from None


@contextlib.contextmanager
def _named(section: str) -> Iterator[None]:
    """Prefix a factory's ConfigError with the config section it came from."""
    try:
        yield
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith(section) else f"{section}: {text}") from None


def build(config: Config, device: str | torch.device | None = None) -> Experiment:
    """Seed, then build data, model, constraints, objective and optimiser from ``config``."""
    dev = _device(config.train.device) if device is None else torch.device(device)
    torch.manual_seed(config.train.seed)
    with _named("data"):
        data = load_dataset(config, "train")
    with _named("model"):
        model = build_model(config, data).to(dev)
    constraints = []
    for i, spec in enumerate(config.constraints):
        with _named(f"constraints[{i}]"):
            constraints.append(build_constraint(spec, data.image_shape).to(dev))
    with _named("objective"):
        objective = build_objective(config.objective, constraints, config.constraints).to(dev)
    params = [p for p in [*model.parameters(), *objective.parameters()] if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.train.lr)
    batches = Batches(len(data), config.train.batch_size, config.train.seed)
    return Experiment(config, dev, data, model, constraints, objective, optimizer, batches)


# --- run folders -------------------------------------------------------------------------------


def new_run_dir(config: Config, name: str) -> Path:
    """Create and return ``logging.dir / (logging.name or name)-YYYYmmdd-HHMMSS`` (``-2``, ``-3``, ...
    if taken); claimed with an atomic mkdir, so parallel runs never share a folder."""
    base = Path(config.logging.dir) / f"{config.logging.name or name}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    path, k = base, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            k += 1
            path = base.with_name(f"{base.name}-{k}")


def write_atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects; a clear error if it is unreadable."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {reason}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a geco checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def _save_config(config: Config, run_dir: Path) -> None:
    import tomli_w

    text = tomli_w.dumps(config.to_dict()).encode()
    write_atomic(run_dir / "config.toml", lambda f: f.write(text))


# --- logging -----------------------------------------------------------------------------------


class Logger:
    """metrics.jsonl, TensorBoard and the progress bar, fed every ``log_every`` steps."""

    def __init__(self, run_dir: Path, config: Config, start: int) -> None:
        from tqdm.auto import tqdm

        self.path = run_dir / "metrics.jsonl"
        self._truncate(start)
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        self.tb = None
        if config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start + 1 if start else None)
        self.bar = tqdm(
            total=config.train.steps,
            initial=start,
            desc=run_dir.name,
            disable=not config.logging.progress,
            dynamic_ncols=True,
        )

    def _truncate(self, step: int) -> None:
        """Forget lines logged after ``step`` (a resumed run logs them again)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        text = "".join(line + "\n" for line in keep).encode()
        write_atomic(self.path, lambda f: f.write(text))

    def log(self, step: int, values: dict[str, float], postfix: dict[str, str]) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        self.bar.set_postfix(postfix, refresh=False)

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _log_values(exp: Experiment, metrics: dict[str, Tensor]) -> tuple[dict[str, float], dict[str, str]]:
    """Host-side metrics and the progress bar's postfix (the one host sync of a logged step)."""
    values = {k: float(v) for k, v in metrics.items()}
    postfix = {"KL": f"{values['kl']:.2f}", "RMSE": f"{values['rmse']:.4f}"}
    geco = exp.geco
    if geco is not None:
        report = geco.report()
        offset = 0
        for constraint in exp.constraints:
            names = component_names(constraint)
            span = slice(offset, offset + len(names))
            reached = constraint.reached(geco.c_ma[span])
            if len(names) <= MAX_LOGGED_COMPONENTS:
                for j, n in enumerate(names):
                    values.update({k: v for k, v in report.items() if k.startswith(f"{n}/")})
                    if reached is not None:
                        values[f"{n}/reached"] = float(reached[j])
                    postfix[n] = f"{float(geco.c_ma[offset + j]):+.3g}"
                    postfix[f"λ_{n}"] = f"{report[f'{n}/lambda']:.3g}"
            else:
                c_ma, lam = geco.c_ma[span], geco.lambdas[span]
                values[f"{constraint.name}/c_ma_max"] = float(c_ma.max())
                values[f"{constraint.name}/satisfied_fraction"] = float((c_ma <= 0).float().mean())
                values[f"{constraint.name}/lambda_median"] = float(lam.median())
                postfix[constraint.name] = f"{float((c_ma <= 0).float().mean()):.0%} met"
            offset += len(names)
        values["geco/skipped"] = report["geco/skipped"]
    elif "beta" in values:
        postfix["β"] = f"{values['beta']:.3g}"
    return values, postfix


# --- training ----------------------------------------------------------------------------------


def train(
    config_path: str | Path | None = None,
    *,
    config: Config | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    run_dir: str | Path | None = None,
) -> Path:
    """Start a new run from a config file (or a Config) in a new run folder; returns the folder."""
    if config is None:
        if config_path is None:
            raise ConfigError("train needs a config file or a Config")
        config = load_config(config_path, overrides)
    if run_dir is not None and Path(run_dir).exists() and any(Path(run_dir).iterdir()):
        raise ConfigError(f"run folder {run_dir} already exists and is not empty: `geco resume {run_dir}` continues it")
    exp = build(config)  # fails on bad data or options before anything is written
    if run_dir is None:
        run_dir = new_run_dir(config, Path(config_path).stem if config_path else "run")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _save_config(config, run_dir)
    _fit(exp, run_dir, start=0)
    return run_dir


def resume(run_dir: str | Path, steps: int | None = None) -> Path:
    """Continue the run in ``run_dir`` from its checkpoint to ``train.steps`` (or to ``steps``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.toml)")
    config = load_config(run_dir / "config.toml")
    state = load_checkpoint(run_dir / CHECKPOINT)
    if steps is not None:
        if steps < state["step"]:
            raise ConfigError(f"--steps {steps} is before the checkpoint's step {state['step']}")
        config = attrs.evolve(config, train=attrs.evolve(config.train, steps=steps))
    exp = build(config)
    start = exp.load_state_dict(state)
    if steps is not None:
        _save_config(config, run_dir)
    _fit(exp, run_dir, start=start)
    return run_dir


def _fit(exp: Experiment, run_dir: Path, start: int) -> None:
    cfg = exp.config.train
    logger = Logger(run_dir, exp.config, start)
    exp.model.train()
    exp.objective.train()
    t0 = time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            metrics = exp.step(step)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                logger.log(done, *_log_values(exp, metrics))
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save_checkpoint(run_dir / CHECKPOINT, exp.state_dict(done))
            logger.advance()
    finally:
        logger.close()
    seconds = time.perf_counter() - t0
    from geco_core.summary import summarise  # plots and held-out evaluation, after the checkpoint

    summarise(exp, run_dir, trained_steps=cfg.steps - start, seconds=seconds)


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


def evaluate_heldout(exp: Experiment, data: ImageData, n: int, batch_size: int = 500) -> dict[str, Any]:
    """Mean KL (nats), pixel RMSE and each constraint's mean value on the first ``n`` examples."""
    n = min(n, len(data))
    kl = sq = 0.0
    values: list[Tensor] = []
    with evaluating(exp.model, exp.objective, *exp.constraints):
        for start in range(0, n, batch_size):
            batch = data.batch(torch.arange(start, min(n, start + batch_size)), exp.device)
            out = exp.forward(batch)
            kl += float(out.kl.sum())
            sq += float((batch.x - out.x_hat).square().flatten(1).mean(1).sum())
            cb = Batch(x=batch.x, x_hat=out.x_hat, labels=batch.labels, context=batch.context, index=batch.index)
            if exp.constraints:
                values.append(torch.cat([c(cb) for c in exp.constraints], 1).sum(0))
    result: dict[str, Any] = {"examples": n, "kl": kl / n, "rmse": math.sqrt(sq / n)}
    if values:
        result["constraint_means"] = (torch.stack(values).sum(0) / n).cpu()
    return result


def heldout_split(exp: Experiment) -> tuple[str, ImageData]:
    """The test split where the dataset has one, else the training data (said in the summary)."""
    try:
        return "test", load_dataset(exp.config, "test")
    except (ConfigError, DataError):
        return "train", exp.data
