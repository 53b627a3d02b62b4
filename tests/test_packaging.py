"""`pip install geco-core geco-re ...` is how users get geco: every distribution builds as a wheel, and
the wheels install into a new virtual environment (with the pinned CPU torch) and work there, away
from this source tree, shipped weights included."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from helpers import REPO

USER_LOOP = textwrap.dedent("""
    import torch
    from geco_core import GECO, Batch, create_constraint
    torch.manual_seed(0)
    decoder = torch.nn.Linear(4, 16)
    geco = GECO([create_constraint("re", kappa=0.1)], lr=1.0)
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    x = torch.rand(32, 1, 4, 4)
    for _ in range(5):
        x_hat = torch.sigmoid(decoder(torch.randn(32, 4))).view_as(x)
        loss = geco(torch.zeros(32), Batch(x, x_hat))
        opt.zero_grad(); loss.backward(); opt.step()
    print("lambda", geco.state().flat()["re/lambda"])
""")


def run(*cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_wheels_install_into_a_clean_virtual_environment_and_work(tmp_path):
    wheels, env = tmp_path / "wheels", tmp_path / "venv"
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--wheel-dir",
        str(wheels),
        str(REPO),
        str(REPO / "plugins" / "geco_re"),
    )
    built = sorted(p.name for p in wheels.glob("*.whl"))
    assert [n.split("-")[0] for n in built] == ["geco_core", "geco_re"], built
    run(sys.executable, "-m", "venv", str(env))
    pip, python = env / "bin" / "pip", env / "bin" / "python"
    run(str(pip), "install", "--quiet", "-c", str(REPO / "constraints.txt"), *map(str, wheels.glob("*.whl")))
    # away from the source tree, so only the installed wheels can be imported
    listing = run(str(env / "bin" / "geco"), "constraints", cwd=tmp_path)
    assert listing.splitlines()[1].split()[:3] == ["re", "geco-re", "0.1.0"]
    where = run(
        str(python),
        "-c",
        "import geco_core, geco_re; print(geco_core.__file__, geco_re.__file__)",
        cwd=tmp_path,
    )
    assert str(REPO) not in where and str(env) in where
    assert run(str(python), "-c", USER_LOOP, cwd=tmp_path).startswith("lambda ")
