"""Plugin discovery through real entry points: the installed RE plugin, and packages that a test
writes and installs on the fly (a working one, a broken one, one whose hook raises, a name clash)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import geco_re
import pytest

from geco_core import ConfigError, create_constraint, registry


def test_re_is_found_through_its_installed_entry_point():
    (ep,) = importlib.metadata.entry_points(group="geco", name="re")
    assert ep.dist.metadata["Name"] == "geco-re"
    entry = registry().get("constraint", "re")
    assert entry.factory is geco_re.ReconstructionError
    assert (entry.distribution, entry.version) == ("geco-re", importlib.metadata.version("geco-re"))
    assert entry.description.startswith("Pixel reconstruction error")


def test_unknown_name_fails_listing_what_is_installed():
    with pytest.raises(ConfigError, match=r"unknown constraint 'nope'; installed: .*re \(geco-re\)"):
        create_constraint("nope")


def test_unknown_argument_is_named_with_the_accepted_ones():
    with pytest.raises(ConfigError, match=r"unknown argument 'kapa' \(accepts: kappa, per, image_shape, kappa_psnr\)"):
        create_constraint("re", kapa=0.1)


def test_geco_constraints_lists_name_distribution_version_and_description(geco_cli):
    out = geco_cli("constraints")
    assert out.returncode == 0, out.stderr
    version = importlib.metadata.version("geco-re")
    line = next(l for l in out.stdout.splitlines() if l.startswith("re "))
    assert line.split()[:3] == ["re", "geco-re", version]
    assert "Pixel reconstruction error" in line


def test_bad_command_exits_non_zero_without_traceback(geco_cli):
    out = geco_cli("constrains")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "invalid choice: 'constrains'" in out.stderr


PACKAGES = {
    # a working constraint plugin
    "geco-tiny": (
        "tiny",
        '''
        import torch
        from geco_core import Constraint, hookimpl

        class Tiny(Constraint):
            """Tiny test constraint: mean absolute error minus kappa."""
            name = "tiny"
            def __init__(self, kappa: float = 0.1):
                super().__init__()
                self.kappa = kappa
            def forward(self, batch):
                return (batch.x - batch.x_hat).abs().flatten(1).mean(1, keepdim=True) - self.kappa

        @hookimpl
        def geco_register_constraints(register):
            register(Tiny)
    ''',
    ),
    # fails to import
    "geco-broken": (
        "broken",
        """
        import module_that_does_not_exist
    """,
    ),
    # imports, but its hook raises
    "geco-raises": (
        "raises",
        """
        from geco_core import hookimpl

        @hookimpl
        def geco_register_constraints(register):
            raise RuntimeError("registration exploded")
    """,
    ),
    # misspells its hook: registers nothing, and says so
    "geco-typo": (
        "typo",
        """
        from geco_core import hookimpl

        @hookimpl
        def geco_register_constrants(register):
            pass
    """,
    ),
    # registers a name that is already taken
    "geco-clash": (
        "clash",
        """
        from geco_core import hookimpl

        @hookimpl
        def geco_register_constraints(register):
            register(lambda kappa: None, name="re", description="an impostor")
    """,
    ),
}


@pytest.fixture(scope="module")
def installed_plugins(tmp_path_factory):
    """pip-install the packages above into a folder; PYTHONPATH makes them visible to a subprocess."""
    src, target = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("site")
    for dist, (module, code) in PACKAGES.items():
        pkg = src / dist
        (pkg / module).mkdir(parents=True)
        (pkg / module / "__init__.py").write_text(textwrap.dedent(code))
        (pkg / "pyproject.toml").write_text(
            textwrap.dedent(f'''
            [build-system]
            requires = ["hatchling"]
            build-backend = "hatchling.build"
            [project]
            name = "{dist}"
            version = "0.3.0"
            [project.entry-points.geco]
            {module} = "{module}"
            [tool.hatch.build.targets.wheel]
            packages = ["{module}"]
        ''')
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            *(str(src / d) for d in PACKAGES),
        ],
        check=True,
        capture_output=True,
    )
    return {**os.environ, "PYTHONPATH": str(target)}


def test_a_package_installed_during_the_test_is_discovered(installed_plugins, geco_cli):
    out = geco_cli("constraints", env=installed_plugins)
    assert out.returncode == 0, out.stderr
    names = {l.split()[0]: l.split()[1:3] for l in out.stdout.splitlines()[1:]}
    assert names["tiny"] == ["geco-tiny", "0.3.0"]
    assert names["re"][0] == "geco-re"  # the clash did not replace the original


def test_broken_plugins_are_reported_once_by_name_without_taking_the_others_down(installed_plugins, geco_cli):
    out = geco_cli("constraints", env=installed_plugins)
    expected = [
        "broken plugin 'broken' (geco-broken) failed: ModuleNotFoundError",
        "broken plugin 'raises' (geco-raises) failed: RuntimeError: registration exploded",
        "broken plugin 'typo' (geco-typo) failed: PluginValidationError: unknown hook 'geco_register_constrants'",
        "broken plugin 'clash' (geco-clash) failed: constraint 're' is already registered by geco-re",
    ]
    lines = out.stderr.splitlines()
    for text in expected:
        assert sum(text in line for line in lines) == 1, (text, out.stderr)
    assert len(lines) == len(expected) and "Traceback" not in out.stderr and "Warning" not in out.stderr


def test_an_installed_plugin_stacks_with_re_in_one_geco(installed_plugins):
    code = textwrap.dedent("""
        import torch, warnings
        warnings.simplefilter("ignore")
        from geco_core import GECO, Batch, create_constraint
        geco = GECO([create_constraint("re", kappa=0.1), create_constraint("tiny", kappa=0.05)])
        x = torch.rand(4, 1, 3, 3)
        geco(torch.zeros(4), Batch(x, x.flip(0)))
        print(sorted(geco.state().flat()))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=installed_plugins, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "'tiny/lambda'" in out.stdout and "'re/lambda'" in out.stdout


def test_geco_cores_own_controllers_models_datasets_and_objectives_need_no_entry_point(monkeypatch):
    """They are registered directly (plugins.DEFAULT_PLUGINS), so a source tree that is not
    installed has them: with no entry point at all the registry still holds every built-in."""
    import importlib.metadata

    from geco_core import registry

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kwargs: [])
    registry.cache_clear()
    try:
        reg = registry()
        assert {"paper", "restart"} <= set(reg.names("controller")) and "conv-vae" in reg.names("model")
        assert "shapes" in reg.names("dataset") and "geco" in reg.names("objective")
        assert reg.get("controller", "restart").distribution == "geco-core" and not reg.failures
    finally:
        registry.cache_clear()
