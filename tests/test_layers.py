"""The layering in pyproject.toml (import-linter's ``layers`` contract: the math at the bottom, the
command line on top, imports running downward only) holds for the package, and the same check
fails on a copy of the package with one upward import planted in it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True))")


def lint(package_parent: Path) -> subprocess.CompletedProcess:
    """import-linter on the ``fourbit`` package found first in ``package_parent``."""
    return subprocess.run([sys.executable, "-c", LINT, str(ROOT / "pyproject.toml")], cwd=package_parent,
                          env=os.environ | {"PYTHONPATH": str(package_parent)}, capture_output=True, text=True)


def test_imports_run_downward_through_the_layers():
    result = lint(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    shutil.copytree(ROOT / "src" / "fourbit", tmp_path / "fourbit", ignore=shutil.ignore_patterns("__pycache__"))
    planted = tmp_path / "fourbit" / "quant" / "blockwise.py"
    planted.write_text(planted.read_text() + "\nfrom ..train import recipe  # planted: the math importing training\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "fourbit.quant.blockwise -> fourbit.train.recipe" in result.stdout, result.stdout
