"""The package layout and the command line: one installed `medtune`, one console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medtune.cli import main, pending_stages

from conftest import REPO

SUBPACKAGES = ("training", "serving", "chatbot", "evaluation", "guardrails")


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_top_level_folders_are_subpackages(name):
    import importlib

    mod = importlib.import_module(f"medtune.{name}")
    assert Path(mod.__file__).resolve().parent == REPO / name


def test_imports_work_from_any_directory(tmp_path):
    code = "import medtune.training.prepare, medtune.guardrails, medtune.cli; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_storage_contract_and_policy_modules_stay_light(tmp_path):
    """guardrails and the record schema must not drag torch/ray in at import time."""
    code = (
        "import sys, medtune.guardrails, medtune.training.records, medtune.fileio;"
        "heavy = [m for m in ('torch', 'ray', 'vllm', 'transformers') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_console_script_help_lists_every_subcommand():
    exe = shutil.which("medtune", path=str(Path(sys.executable).parent))
    assert exe, "the medtune console script is installed next to the interpreter"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for name in ("data", "model", "train", "submit", "serve", "guard", "chat", "eval", "demo"):
        assert name in out.stdout


@pytest.mark.parametrize("name", sorted(pending_stages()) or [pytest.param("-", marks=pytest.mark.skip("every stage is built"))])
def test_pending_subcommands_say_so(name, capsys):
    assert main([name]) == 2
    assert "not yet available" in capsys.readouterr().err


def test_unknown_subcommand_is_a_usage_error():
    with pytest.raises(SystemExit) as err:
        main(["frobnicate"])
    assert err.value.code == 2
