"""The callbacks ``geco train`` runs (:func:`~geco_core.training.loop.default_callbacks`): the
metrics file, TensorBoard, the progress bar, the divergence guard, checkpoints, plots and the
summary. Each is one small class; add your own by subclassing :class:`Callback`."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from geco_core.training.loop import Callback, Trainer
from geco_core.training.run import nonfinite_entries, strict_json, write_atomic

__all__ = ["MetricsFile", "TensorBoard", "ProgressBar", "DivergenceGuard", "Checkpointing", "Plots", "Summary"]


class MetricsFile(Callback):
    """``metrics.jsonl``: one strict-JSON line per record. On resume the lines logged after the
    checkpoint are dropped (the resumed run logs them again) and the earlier ones become the
    trainer's records."""

    def on_fit_start(self, trainer: Trainer) -> None:
        run = trainer.run
        kept = [r for r in run.read_metrics() if r["step"] <= trainer.start]
        text = "".join(strict_json(r) + "\n" for r in kept).encode()
        write_atomic(run.metrics_path, lambda f: f.write(text))
        trainer.records[:0] = kept
        self.file = open(run.metrics_path, "a")  # noqa: SIM115 - closed in on_teardown

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.file.write(strict_json(record) + "\n")
        self.file.flush()

    def on_teardown(self, trainer: Trainer) -> None:
        if getattr(self, "file", None) is not None:
            self.file.close()


class TensorBoard(Callback):
    """The records as TensorBoard scalars under ``tb/`` (a resumed run purges the steps after its
    checkpoint)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        start = trainer.start
        self.writer = SummaryWriter(str(trainer.run.tb_dir), purge_step=start + 1 if start else None)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        for k, v in record.items():
            if k != "step":
                self.writer.add_scalar(k, v, record["step"])

    def on_teardown(self, trainer: Trainer) -> None:
        if getattr(self, "writer", None) is not None:
            self.writer.close()


class ProgressBar(Callback):
    """A tqdm bar: KL, RMSE, and per constraint component its moving average and lambda (or
    ``unreachable``)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        steps = trainer.exp.config.train.steps
        self.bar = tqdm(total=steps, initial=trainer.start, desc=trainer.run.path.name, dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Tensor] | None) -> None:
        self.bar.update(1)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        postfix = {"KL": f"{record['kl']:.2f}", "RMSE": f"{record['rmse']:.4f}"}
        geco = trainer.exp.geco
        if geco is not None:
            for name in geco.component_names:
                if f"{name}/c_ma" in record:
                    postfix[name] = f"{record[f'{name}/c_ma']:+.3g}"
                    unreachable = record.get(f"{name}/unreachable")
                    postfix[f"λ_{name}"] = "unreachable" if unreachable else f"{record[f'{name}/lambda']:.3g}"
        elif "beta" in record:
            postfix["β"] = f"{record['beta']:.3g}"
        self.bar.set_postfix(postfix, refresh=False)

    def on_teardown(self, trainer: Trainer) -> None:
        if getattr(self, "bar", None) is not None:
            self.bar.close()


class DivergenceGuard(Callback):
    """Stops the run as ``diverged`` when ``train.max_nonfinite_steps`` steps in a row had a
    non-finite loss or gradient (each was skipped), or when the optimiser's state is no longer
    finite (checked on logged steps: Adam's second moment overflows under enormous gradients and
    then freezes the model silently)."""

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Tensor] | None) -> None:
        limit = trainer.exp.config.train.max_nonfinite_steps
        if trainer.nonfinite_in_a_row >= limit:
            trainer.stop(
                "diverged", f"{limit} steps in a row with a non-finite loss or gradient (to step {trainer.step})"
            )
        elif metrics is not None:
            bad = nonfinite_entries(trainer.exp.optimizer.state_dict()["state"])
            if bad:
                trainer.stop("diverged", f"the optimiser state holds NaN or infinity at step {trainer.step} ({bad[0]})")
        if trainer.status == "diverged":
            last = trainer.last_good_checkpoint
            where = f"step {last} in {trainer.run.checkpoint_path}" if last is not None else "none was written"
            trainer.reason = f"run diverged: {trainer.reason}; last good checkpoint: {where}"


class Checkpointing(Callback):
    """``checkpoints/latest.pt`` every ``train.checkpoint_every`` steps and at the end, atomically.
    Only after a finite step (a due checkpoint waits for the next one), and never from a state
    holding NaN or infinity: a diverging run never overwrites its last good checkpoint."""

    def on_fit_start(self, trainer: Trainer) -> None:
        self.due = False
        trainer.last_good_checkpoint = trainer.start if trainer.run.has_checkpoint() else None

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Tensor] | None) -> None:
        cfg = trainer.exp.config.train
        self.due = self.due or trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps
        if self.due and trainer.last_step_finite and trainer.status == "running":
            state = trainer.exp.state_dict(trainer.step)  # on every process: it gathers their RNG states
            bad = nonfinite_entries({k: state[k] for k in ("model", "objective", "optimizer")})
            if bad:  # the same on every process: their states are in step
                trainer.stop("diverged", f"{bad[0]} holds NaN or infinity at step {trainer.step}; not written")
                return
            if trainer.exp.processes.main:
                trainer.run.save_checkpoint(state)
            trainer.last_good_checkpoint = trainer.step
            self.due = False


class Plots(Callback):
    """At the end: ``plots/trajectory.png`` (the paper's Figure 1 for this run) and
    ``plots/grid.png`` (held-out data, reconstructions, samples)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        from geco_core.training.plots import plot_trajectory, save_grid
        from geco_core.training.summary import grid_rows, kappas

        if not trainer.records:
            return
        exp, folder = trainer.exp, trainer.run.plots_dir
        title = f"{exp.config.objective.name} · {exp.config.model.name} · {exp.config.data.name}"
        plots = trainer.artifacts.setdefault("plots", {})
        plots["trajectory"] = str(plot_trajectory(trainer.records, kappas(exp), folder / "trajectory.png", title))
        images, labels = grid_rows(exp, exp.heldout[1])
        plots["grid"] = str(save_grid(images, folder / "grid.png", labels))


class Summary(Callback):
    """At the end: the held-out evaluation and ``summary.json`` (also ``trainer.summary``)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        from geco_core.training.summary import summarise

        trainer.summary = summarise(trainer)
        text = strict_json(trainer.summary, indent=2).encode()
        write_atomic(trainer.run.summary_path, lambda f: f.write(text))
