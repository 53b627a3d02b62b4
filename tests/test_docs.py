"""The documentation: the site builds with ``mkdocs build --strict`` (no broken link, anchor or
reference), and the Python examples of the README and of its pages run as written (with tiny
stand-ins for the user's data loader and the quickstart's length)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def python_blocks() -> list[str]:
    return [b for page in PAGES for b in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = (tmp_path / "site" / "configs" / "index.html").read_text()
    assert "validate_every" in reference and "kappa_psnr" in reference  # written from the code


def test_every_python_block_of_the_docs_is_run_by_a_test():
    """A block is run by one of the tests below: the own loop, the callback, the plugin."""
    markers = ("for x, y in loader", "class PrintLambda(Callback)", "geco_register_constraints", "ConstraintContract",
               "finder = KappaFinder(", "class TinyVAE(VAE)", "tabular data: 12 features")  # fmt: skip
    for block in python_blocks():
        assert any(m in block for m in markers), block[:200]


def test_the_own_loop_example_trains_moves_lambda_and_skips_non_finite_batches():
    block, *others = [b for b in python_blocks() if "for x, y in loader" in b]
    assert all(other == block for other in others)  # the README and Getting started show the same loop
    images = [torch.rand(8, 1, 28, 28) for _ in range(4)]
    images[2][0, 0, 0, 0] = float("nan")  # a broken batch: its step must be skipped, the model kept finite
    loader = [(x, torch.randint(0, 10, (8,))) for x in images]
    scope = {"loader": loader, "print": lambda *a: None}
    exec(compile(block, "README.md", "exec"), scope)
    geco, model = scope["geco"], scope["model"]
    assert int(geco.step) == 3 and int(geco.skipped) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    start = type(geco)([scope["re"]], alpha=0.9).lambdas  # where the same GECO starts
    assert geco.lambdas.item() > start.item()  # random images are far above kappa: lambda rose


def test_the_own_loop_finder_example_runs_and_gives_the_commands_result(tmp_path, monkeypatch):
    """The KappaFinder block of docs/kappa.md, shortened to 80 steps on random images: it probes 40
    times, the table and plot are written, and GECO leaves the finder as it entered it."""
    from geco_core import GECO, create_constraint
    from geco_core.models import MLPVAE

    (block,) = [b for b in python_blocks() if "finder = KappaFinder(" in b]
    block = block.replace("steps=2000, budget=5000", "steps=80, budget=200")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = MLPVAE((1, 8, 8), latent_dim=4, hidden=(32,))
    geco = GECO([create_constraint("re", kappa=0.2, image_shape=(1, 8, 8))], alpha=0.9)
    images = torch.rand(64, 1, 8, 8)
    batches = (images[i % 8 * 8 : i % 8 * 8 + 8] for i in range(10**6))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scope = {"geco": geco, "model": model, "optimizer": optimizer, "batches": batches, "x_val": torch.rand(32, 1, 8, 8),
             "print": lambda *a: None}  # fmt: skip
    before = {k: v.clone() for k, v in geco.state_dict().items() if isinstance(v, torch.Tensor)}
    exec(compile(block, "kappa.md", "exec"), scope)
    result = scope["result"]
    assert len(result.points) == 40 and result.finder_steps == 80
    assert [p["step"] for p in result.points] == list(range(2, 81, 2))
    factors = [p["factor"] for p in result.points]
    assert max(factors) == pytest.approx(100.0) and factors[-1] == pytest.approx(3e-3, rel=1e-3)  # the ramp
    assert "reachable floor at 200 steps" in result.table() and (tmp_path / "kappa.png").stat().st_size > 5000
    assert geco.controller.name == "restart"
    assert all(torch.equal(v, geco.state_dict()[k]) for k, v in before.items())


def test_your_model_by_import_path_trains_and_a_broken_one_is_told_in_one_line(tmp_path, monkeypatch):
    """The TinyVAE block of docs/models.md, as mymodels.py: geco train builds it from its import
    path with the table's options and trains; a missing module, a missing class, a class that is
    no nn.Module and one whose forward returns the wrong thing each stop the build with one line."""
    from test_training import TINY, config

    from geco_core import ConfigError
    from geco_core.plugins import registry
    from geco_core.training import Config, Run, build, train

    (block,) = [b for b in python_blocks() if "class TinyVAE(VAE)" in b]
    bad = """
class NotAModule:
    def __init__(self, image_shape):
        pass

class WrongOutput(TinyVAE):
    def forward(self, x, context=None):
        out = super().forward(x)
        return out.logits.flatten(1), out.kl
"""
    (tmp_path / "mymodels.py").write_text(block + bad)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.cache_clear()
    run = train(config=config(model={"name": "mymodels:TinyVAE", "latent_dim": 3, "hidden": 16}),
                run_dir=tmp_path / "run")  # fmt: skip
    assert Run.open(run).read_summary()["steps"] == 20
    import mymodels

    model = build(config(model={"name": "mymodels:TinyVAE", "latent_dim": 3, "hidden": 16})).model
    assert isinstance(model, mymodels.TinyVAE) and model.latent_dim == 3
    cases = {
        "nomodule_xyz:TinyVAE": "cannot import 'nomodule_xyz'",
        "mymodels:Nope": "module 'mymodels' has no class or function 'Nope'",
        "mymodels:NotAModule": "lacks subclass torch.nn.Module, forward, sample",
        "mymodels:WrongOutput": "forward must return Output(logits (2, 3, 16, 16), kl (2,))",
    }
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)) as error:
            only = Config.from_dict({**TINY, "model": {"name": name}})
            train(config=only, run_dir=tmp_path / name.replace(":", "-"))
        assert "\n" not in str(error.value) and not (tmp_path / name.replace(":", "-")).exists()
    with pytest.raises(ConfigError, match="unknown key model.depth for model 'mymodels:TinyVAE'"):
        Config.from_dict({**TINY, "model": {"name": "mymodels:TinyVAE", "depth": 3}})


def test_the_vector_example_meets_rmse_on_tabular_data():
    """The tabular block of docs/models.md, shortened to 1500 steps: GECO's lambda moved from
    where it started and the reconstruction RMSE of the table ends near kappa."""
    (block,) = [b for b in python_blocks() if "tabular data: 12 features" in b]
    block = block.replace("range(3000)", "range(1500)")
    scope = {"print": lambda *a: None}
    exec(compile(block, "models.md", "exec"), scope)
    geco, table, encoder, decoder = scope["geco"], scope["table"], scope["encoder"], scope["decoder"]
    with torch.no_grad():
        mu, _ = encoder(table).chunk(2, dim=1)
        rmse = float((torch.sigmoid(decoder(mu)) - table).square().mean().sqrt())
    start = type(geco)([scope["create_constraint"]("re", kappa=0.05)]).lambdas[0]
    assert int(geco.step) == 1500 and float(geco.lambdas[0]) != pytest.approx(float(start))
    assert rmse <= 0.05  # kappa met (decoding the posterior mean; an untrained decoder is near 0.3)


def test_the_callback_example_runs_and_its_callback_sees_every_record(tmp_path, monkeypatch, capsys):
    (block,) = [b for b in python_blocks() if "class PrintLambda(Callback)" in b]
    monkeypatch.chdir(REPO)
    block = block.replace('overrides=["train.steps=20"]', f'overrides=["train.steps=20", "logging.dir=\'{tmp_path}\'"]')
    exec(compile(block, "README.md", "exec"), {})
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [int(p[0]) for p in printed] == [10, 20] and all(float(p[1]) > 0 for p in printed)


def test_the_plugin_example_defines_a_working_constraint():
    (block,) = [b for b in python_blocks() if "geco_register_constraints" in b]
    scope: dict = {}
    exec(compile(textwrap.dedent(block), "README.md", "exec"), scope)
    registered = []
    scope["geco_register_constraints"](registered.append)
    (cls,) = registered
    from geco_core import Batch

    mae = cls(kappa=0.1)
    x = torch.rand(4, 1, 5, 5)
    values = mae(Batch(x=x, x_hat=x + 0.2))
    torch.testing.assert_close(values, torch.full((4, 1), 0.1))
    torch.testing.assert_close(mae.reached(values), torch.full((4, 1), 0.2))


def shell_commands() -> list[tuple[str, list[str]]]:
    """Every ``geco`` command of the docs' and plugin READMEs' bash blocks: (page, arguments)."""
    import shlex

    pages = [*PAGES, *sorted(REPO.glob("plugins/*/README.md"))]
    found = []
    for page in pages:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            lines = block.replace("\\\n", " ").splitlines()
            for command in (part for line in lines for part in re.split(r"&&|;|\|", line.split("#")[0])):
                words = shlex.split(command)
                starts = [i for i, w in enumerate(words) if w.endswith("geco") or w.endswith("bin/geco")]
                if starts and len(words) > starts[0] + 1:
                    found.append((page.name, words[starts[0] + 1 :]))
    return found


def test_every_geco_command_in_the_docs_parses_and_its_configs_resolve(monkeypatch):
    """What a reader copies must run: every documented ``geco train``/``find-kappa``/``sweep``
    parses, and its configs with its ``--set`` overrides (and, for a sweep, every planned run)
    resolve. A stale option name in a page fails here, not in a reader's terminal."""
    from geco_core.cli import build_parser
    from geco_core.evaluation.sweep import plan
    from geco_core.training import load_config

    monkeypatch.chdir(REPO)
    commands = shell_commands()
    assert {"train", "sweep", "find-kappa", "eval"} <= {c[0] for _, c in commands}
    for page, words in commands:
        args = build_parser().parse_args(words)
        if args.command == "sweep":
            assert plan(args.configs, args.kappa, args.objectives, args.set), (page, words)
        elif args.command in ("train", "find-kappa"):
            load_config(args.config, args.set)
