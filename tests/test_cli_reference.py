"""docs/cli.md is the current --help of every entry point (regenerate: python docs/cli_reference.py)."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT
from fault_injection import subprocess_env


def _generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli_reference", REPO_ROOT / "docs" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current():
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "docs" / "cli_reference.py"), "--check"], cwd=REPO_ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:] or "docs/cli.md is stale: run `python docs/cli_reference.py`"


def test_every_entry_point_is_found_and_documented():
    """The discovery finds the trainers, samplers and tools; each has its flags in docs/cli.md."""
    commands = [command for command, _, _ in _generator().entry_points()]
    for expected in ("python train_sCM.py", "python train_meanflow.py", "python train_rescale.py", "python test_sCM.py",
                     "python test_meanflow.py", "python test_flux8b.py", "python check_rescale.py",
                     "python export_diffusers.py", "python -m training.plot_metrics",
                     "python -m evaluation.summarize_geneval"):
        assert expected in commands
    text = (REPO_ROOT / "docs" / "cli.md").read_text()
    for command in commands:
        assert f"## {command}\n" in text
    section = text.split("## python train_sCM.py\n")[1].split("\n## ")[0]
    for flag in ("--use_ema", "--validation_prompt", "--report_to", "--max_nonfinite_steps", "--sigma_data"):
        assert flag in section
    assert "/work/" not in text and "<repo>" in text  # no machine-specific paths
