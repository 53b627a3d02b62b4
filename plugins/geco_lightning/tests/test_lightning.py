"""GECO inside PyTorch Lightning: the example trains on one device and on two (DDP, gloo), the
multipliers agree, they are logged and checkpointed, and a run resumed from a Lightning checkpoint
continues as if it had not stopped."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("geco_lightning")  # an optional integration: its tests need it installed


def run(out, *args) -> dict:
    cmd = [sys.executable, "-m", "geco_lightning.example", "--constraint", "test-mae", "--kappa", "0.2",
           "--no-sample", "--ordered", "--out", str(out), *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out.parent)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (line,) = lines
    return json.loads(line)


def test_one_and_two_devices_reach_the_same_multipliers_and_log_them(tmp_path):
    one = run(tmp_path / "one", "--devices", 1, "--epochs", 2)
    two = run(tmp_path / "two", "--devices", 2, "--epochs", 2)
    assert one["step"] == two["step"] == 16  # 256 examples, global batch 32, two epochs
    for key in ("test-mae/lambda", "test-mae/c_ma"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    assert one["test-mae/lambda"] != pytest.approx(1.0)  # it moved
    with open(tmp_path / "two" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("geco/test-mae/lambda")]
    assert len(rows) >= 15 and float(rows[-1]["geco/test-mae/lambda"]) == pytest.approx(
        two["test-mae/lambda"], rel=1e-5
    )


def test_the_multipliers_are_in_the_checkpoint_and_a_resumed_run_continues_exactly(tmp_path):
    straight = run(tmp_path / "straight", "--epochs", 2)
    run(tmp_path / "half", "--epochs", 1)
    (ckpt,) = (tmp_path / "half").glob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert {"geco.log_lambdas", "geco.c_ma", "geco.step"} <= set(state)
    assert state["geco._extra_state"]["components"] == ["test-mae"]
    resumed = run(tmp_path / "resumed", "--epochs", 2, "--resume", ckpt)
    for key in ("test-mae/lambda", "test-mae/c_ma", "geco/step"):
        assert resumed[key] == straight[key], key


# --- held-out kappa and the finder, in process ------------------------------------------------------


def loaders(n_train: int = 128, n_val: int = 64):
    from geco_lightning.example import data

    train = torch.utils.data.DataLoader(data(n_train, seed=0), batch_size=32)
    val = torch.utils.data.DataLoader(data(n_val, seed=1), batch_size=32)
    return train, val


def trainer(**options):
    from geco_lightning import L

    defaults = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "deterministic": True}  # fmt: skip
    return L.Trainer(**{**defaults, **options})


def test_the_callback_feeds_validation_values_to_geco_which_keeps_the_generalisation_gap(tmp_path):
    """One epoch, one validation at its end: the gap is the validation bound (mean + confidence
    standard errors) above the final moving average, measured on the held-out loader."""
    from geco_lightning import GecoCallback, L
    from geco_lightning.example import LitVAE

    L.seed_everything(0)
    module = LitVAE("test-mae", kappa=0.2, sample=False)
    train, val = loaders()
    darker = torch.utils.data.TensorDataset(*[t * 0.3 if t.is_floating_point() else t for t in val.dataset.tensors])
    val = torch.utils.data.DataLoader(darker, batch_size=32)  # held-out data unlike the training data
    trainer(max_epochs=1, callbacks=[GecoCallback()], num_sanity_val_steps=2).fit(module, train, val)
    geco = module.geco
    assert bool(geco.validated)
    module.eval()
    with torch.no_grad():
        values = torch.cat([module.validation_step(batch, i)["constraint_values"] for i, batch in enumerate(val)])
    n = len(values)
    bound = values.mean(0) + geco.confidence * values.std(0) / n**0.5
    assert geco.gap.tolist() == pytest.approx((bound - geco.c_ma).tolist(), rel=1e-4, abs=1e-6)
    assert abs(float(geco.gap)) > 1e-2  # the held-out loader's, not the training batches'
    plain = LitVAE("test-mae", kappa=0.2, sample=False)
    plain.validation_step = lambda batch, batch_idx: None  # returns no constraint values: nothing to validate
    trainer(max_epochs=1, callbacks=[GecoCallback()]).fit(plain, train, val)
    assert not bool(plain.geco.validated) and float(plain.geco.gap) == 0.0


def test_find_kappa_on_a_lightning_module_is_the_own_loop_finder_and_puts_the_weights_back(tmp_path):
    """The tuner-style finder runs the ramp on the user's module and its validation_step; the same
    steps written as a plain loop with KappaFinder give the same points, hence the same result;
    the module comes back as it was."""
    from geco_lightning import L, find_kappa
    from geco_lightning.example import LitVAE

    from geco_core.evaluation.kappa import KappaFinder

    steps = 80
    L.seed_everything(0)
    module = LitVAE("test-mae", kappa=0.2, sample=False)
    before = copy.deepcopy(module.state_dict())
    train, val = loaders()
    result = find_kappa(module, train, val, steps=steps, budget=200, folder=tmp_path / "lit", accelerator="cpu",
                        deterministic=True)  # fmt: skip
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))
    assert module.geco.controller.name == "restart"
    assert {"kappa.json", "kappa.md", "kappa.png"} <= {p.name for p in (tmp_path / "lit").iterdir()}

    L.seed_everything(0)
    own = LitVAE("test-mae", kappa=0.2, sample=False)
    optimizer = own.configure_optimizers()
    finder = KappaFinder(own.geco, steps=steps, budget=200)
    with finder:
        step = 0
        while step < steps:
            for x, y in train:
                own.train()
                loss = own.training_step((x, y), step)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                if finder.due(step):
                    own.eval()
                    with torch.no_grad():
                        outs = [own.validation_step(batch, i) for i, batch in enumerate(val)]
                    finder.probe(step, torch.cat([o["constraint_values"] for o in outs]),
                                 torch.cat([o["kl"] for o in outs]))  # fmt: skip
                if step == steps:
                    break
    mine = finder.result()
    assert len(result.points) == len(mine.points) == 40
    for a, b in zip(result.points, mine.points):
        assert a["step"] == b["step"] and a["factor"] == pytest.approx(b["factor"], rel=1e-5)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-6)
        assert a["values"]["test-mae"] == pytest.approx(b["values"]["test-mae"], rel=1e-4)
    assert result.suggestion() == pytest.approx(mine.suggestion(), rel=1e-3)
    assert result.table().splitlines()[0] == "kappa finder: 80 steps; the floor is for runs of 200 steps"
    floor = result.constraint("test-mae").floor
    assert result.predict_kl(floor * 0.5) is None  # beyond the floor: out of reach
