"""A run folder, one type for train, resume, eval and sweep: :class:`Run` (its files: docs/training.md).
Every mistake with a path is one line naming the path; a write that fails leaves the previous file
as it was and no temporary file behind."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import filelock
import torch

from geco_core.errors import CheckpointError, ConfigError, RunFolderError
from geco_core.training.checkpoint import load_checkpoint, nonfinite_weights
from geco_core.training.config import Config, load_config
from geco_core.training.rows import ConstraintRow

__all__ = ["Run", "CHECKPOINT", "write_atomic", "load_checkpoint", "strict_json"]

CHECKPOINT = Path("checkpoints") / "latest.pt"
RECORDS = ("metrics.jsonl", "summary.json", "eval.json")


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``. A failure
    (a full disk, a missing folder) removes the temporary file, leaves ``path`` as it was, and is a
    :class:`CheckpointError` naming ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError | RuntimeError):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
            raise CheckpointError(f"cannot write {path}: {reason} (the previous file, if any, is intact)") from None
        raise


def strict_json(obj: Any, indent: int | None = None) -> str:
    """Strict JSON (``NaN`` and ``Infinity`` are not JSON): non-finite floats become null; a record
    with a ``to_json`` method (a summary's :class:`~geco_core.training.rows.ConstraintRow`) is
    written as what that returns."""

    def clean(v: Any) -> Any:
        if hasattr(v, "to_json"):
            return clean(v.to_json())
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), allow_nan=False, indent=indent)


class Run:
    """A run folder and its config. :meth:`create` makes a new one, :meth:`open` an existing one;
    both fail with one line naming the path."""

    def __init__(self, path: Path, config: Config) -> None:
        self.path = Path(path)
        self.config = config
        self.checkpoint_path = self.path / CHECKPOINT
        self.metrics_path, self.summary_path, self.eval_path = (self.path / f for f in RECORDS)
        self.plots_dir, self.tb_dir = self.path / "plots", self.path / "tb"

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    def create(cls, config: Config, path: str | Path | None = None, name: str = "run") -> Run:
        """A new run folder for ``config``: ``path``, or ``logging.dir/(logging.name or name)-<time>``
        (``-2``, ``-3``, ... if taken, claimed with an atomic mkdir). ``path`` may exist if it is
        empty, or holds only a run of the same config that never reached a checkpoint (a run killed
        early restarts in place)."""
        if path is None:
            base = Path(config.logging.dir) / f"{config.logging.name or name}-{time.strftime('%Y%m%d-%H%M%S')}"
            _make_folder(base.parent, "logging.dir")
            folder, k = base, 1
            while True:
                try:
                    folder.mkdir()
                    break
                except FileExistsError:
                    k += 1
                    folder = base.with_name(f"{base.name}-{k}")
                except OSError as exc:
                    raise RunFolderError(f"cannot create run folder {folder}: {exc.strerror}") from None
        else:
            folder = Path(path)
            if folder.exists() and not folder.is_dir():
                raise RunFolderError(f"run folder {folder} is a file, not a folder")
            if folder.is_dir() and any(folder.iterdir()) and not cls._restartable(folder, config):
                raise RunFolderError(
                    f"run folder {folder} already exists and is not empty: `geco resume {folder}` continues it"
                )
            _make_folder(folder, "--run-dir")
        run = cls(folder, config)
        run.save_config(config)
        return run

    @staticmethod
    def _restartable(folder: Path, config: Config) -> bool:
        """A folder holding this config and no checkpoint: a run that died before its first one."""
        try:
            return not (folder / CHECKPOINT).exists() and load_config(folder / "config.toml", resolved=True) == config
        except ConfigError:
            return False

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """An existing run folder; its config is read and checked."""
        folder = Path(path)
        if not folder.exists():
            raise RunFolderError(f"run folder {folder} does not exist")
        if not folder.is_dir():
            raise RunFolderError(f"{folder} is a file, not a run folder")
        if not (folder / "config.toml").is_file():
            raise RunFolderError(f"{folder} is not a run folder (no config.toml)")
        return cls(folder, load_config(folder / "config.toml", resolved=True))

    # --- contents ------------------------------------------------------------------------------

    def save_config(self, config: Config) -> None:
        """Write the resolved ``config`` as ``config.toml`` (atomically)."""
        text = config.to_toml().encode()
        write_atomic(self.path / "config.toml", lambda f: f.write(text))
        self.config = config

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def load_checkpoint(self) -> dict[str, Any]:
        return load_checkpoint(self.checkpoint_path)

    def checkpoint_step(self) -> int:
        """The step of the checkpoint (0 if there is none)."""
        return int(self.load_checkpoint()["step"]) if self.has_checkpoint() else 0

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically over the checkpoint. A state holding NaN or infinity is
        refused (:class:`CheckpointError` naming the first such tensor): it never replaces a good
        checkpoint."""
        bad = nonfinite_weights(state)
        if bad:
            raise CheckpointError(
                f"not writing a checkpoint at step {state.get('step')}: {bad[0]} holds NaN or infinity "
                f"({len(bad)} tensor(s)); {self.checkpoint_path} keeps the last good state"
            )
        _make_folder(self.checkpoint_path.parent, "checkpoint folder")
        write_atomic(self.checkpoint_path, lambda f: torch.save(state, f))

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every logged record, in order (``metrics.jsonl``)."""
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def read_summary(self) -> dict[str, Any] | None:
        """The run's ``summary.json`` (None before it ends), its constraint rows typed
        (:class:`~geco_core.training.rows.ConstraintRow`)."""
        if not self.summary_path.is_file():
            return None
        summary = json.loads(self.summary_path.read_text())
        summary["constraints"] = [ConstraintRow.from_json(r) for r in summary.get("constraints", [])]
        return summary

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's lock while training in it; a second process is refused with one line.
        The lock is an advisory file lock on ``.lock`` (filelock): the system drops it when a
        process dies."""
        lock = filelock.FileLock(self.path / ".lock", timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise RunFolderError(f"run folder {self.path} is in use by another geco process") from None
        try:
            yield
        finally:
            lock.release()


def _make_folder(path: Path, what: str) -> None:
    """``mkdir -p`` with one-line errors naming ``what`` and the path."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunFolderError(f"{what} {path}: a file is in the way of the folder") from None
    except OSError as exc:
        raise RunFolderError(f"{what} {path}: cannot create the folder ({exc.strerror})") from None
