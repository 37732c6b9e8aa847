"""The package's layering holds: stages import only downwards and no package has an import cycle.

The contracts live in pyproject.toml ([tool.importlinter]); import-linter checks them against the
real import graph of src/qera (every import, including those inside functions).
"""

import subprocess
import sys
import tomllib
from pathlib import Path

import qera

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(qera.__file__).resolve().parent


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _lint(*contracts: str) -> subprocess.CompletedProcess:
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code, str(ROOT / "pyproject.toml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    out = _lint()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout and "BROKEN" not in out.stdout


def test_every_stage_package_is_a_layer():
    """A new subpackage of qera cannot sit outside the layers contract (where nothing would check it)."""
    layers = next(c for c in _contracts() if c["type"] == "layers")["layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    packages = {f"qera.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py")}
    assert packages == named, f"packages outside the layers contract: {sorted(packages - named)}"
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py", "_version.py"))
    assert not loose, f"modules outside every stage: {loose}"


def test_the_contract_catches_an_upward_import(tmp_path):
    """The check is not vacuous: a copy of the tree with one upward import (core → cli) is reported."""
    import shutil

    tree = tmp_path / "src"
    shutil.copytree(PACKAGE, tree / "qera", ignore=shutil.ignore_patterns("__pycache__"))
    bad = tree / "qera" / "core" / "linalg.py"
    bad.write_text(bad.read_text() + "\n\ndef _upward():\n    from qera.cli import common  # noqa: F401\n")
    cfg = tmp_path / "pyproject.toml"
    cfg.write_text((ROOT / "pyproject.toml").read_text())
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")
    out = subprocess.run([sys.executable, "-c", code, str(cfg), str(tree)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0
    assert "qera.core.linalg -> qera.cli.common" in out.stdout
