"""The launch scripts (script/*.sh): what they pass to Python, from any working directory.

Most checks use a stand-in ``PYTHON`` (the scripts honour that variable) that answers the GPU-count
query and records the command line and working directory it was started with, so the shell logic is
tested without starting torch; one run trains for real from another directory.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from fault_injection import subprocess_env

FAKE_PYTHON = """#!/bin/sh
case "$*" in *torch.cuda.device_count*) echo "${FAKE_NGPU:-0}"; exit 0;; esac
pwd > "$FAKE_RECORD"
printf '%s\\n' "$@" >> "$FAKE_RECORD"
"""


@pytest.fixture
def fake_python(tmp_path):
    """(run(script, *args, cwd, ngpu) -> (CompletedProcess, [cwd, argv...]))."""
    exe = tmp_path / "fakepython"
    exe.write_text(FAKE_PYTHON)
    exe.chmod(0o755)
    record = tmp_path / "record.txt"

    def run(script: str, *args: str, cwd: Path, ngpu: int = 0):
        if record.exists():
            record.unlink()
        env = {**os.environ, "PYTHON": str(exe), "FAKE_RECORD": str(record), "FAKE_NGPU": str(ngpu)}
        env.pop("DS_FILE", None)
        proc = subprocess.run(["bash", str(REPO_ROOT / "script" / script), *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=60)
        return proc, (record.read_text().splitlines() if record.exists() else [])

    return run


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_training_launcher_keeps_the_callers_directory(fake_python, tmp_path):
    proc, seen = fake_python("train_sCM.sh", "1e-5", "64", "2", "relout", "rel/rescaled.pt", "--data_dir", "reldata",
                             cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cwd, argv = seen[0], seen[1:]
    assert Path(cwd) == tmp_path  # relative flags are read where the user typed them
    assert argv[:3] == ["-m", "torch.distributed.run", "--nproc_per_node=1"]
    assert str(REPO_ROOT / "train_sCM.py") in argv  # the entry point is found from anywhere
    assert _flag(argv, "--output_dir") == "relout" and _flag(argv, "--rescaled_checkpoint_path") == "rel/rescaled.pt"


def test_deepspeed_config_fallback_is_announced(fake_python, tmp_path):
    """A batch size without its own parallel_config file uses batch8's settings, and says so."""
    proc, seen = fake_python("train_sCM.sh", "1e-5", "64", "2", "out", "r.pt", cwd=tmp_path, ngpu=1)
    assert proc.returncode == 0, proc.stderr
    assert _flag(seen[1:], "--ds_file") == str(REPO_ROOT / "parallel_config" / "deepspeed_bf16_batch8.json")
    assert "no parallel_config/deepspeed_bf16_batch2.json; using deepspeed_bf16_batch8.json" in proc.stderr
    proc, seen = fake_python("train_sCM.sh", "1e-5", "64", "4", "out", "r.pt", cwd=tmp_path, ngpu=1)
    assert _flag(seen[1:], "--ds_file") == str(REPO_ROOT / "parallel_config" / "deepspeed_bf16_batch4.json")
    assert "note:" not in proc.stderr
    proc, seen = fake_python("train_sCM.sh", "1e-5", "64", "2", "out", "r.pt", cwd=tmp_path, ngpu=0)
    assert "--ds_file" not in seen and "note:" not in proc.stderr  # CPU: plain accelerate


def test_geneval_optional_positionals_stop_at_a_flag(fake_python, tmp_path):
    proc, seen = fake_python("geneval_sCM.sh", "run", "20", "--max_prompts", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cwd, argv = seen[0], seen[1:]
    assert Path(cwd) == tmp_path
    assert _flag(argv, "--num_inference_steps") == "2" and _flag(argv, "--guidance_scale") == "4.5"  # the defaults
    assert _flag(argv, "--max_prompts") == "2"
    assert _flag(argv, "--resume_path") == "run/ckpts/transformer_20.pt"
    assert _flag(argv, "--output_dir") == "run/GenEval/GenEval_RESOLUTION512_NFE2_cfg4.5/images/global_steps20"

    proc, seen = fake_python("geneval_meanflow.sh", "run", "20", "1", "--grid", cwd=tmp_path)
    assert _flag(seen[1:], "--num_inference_steps") == "1" and _flag(seen[1:], "--guidance_scale") == "3.5"
    assert "--grid" in seen
    proc, seen = fake_python("geneval_flux8b.sh", "teacher_out", "--max_prompts", "1", cwd=tmp_path)
    assert _flag(seen[1:], "--num_inference_steps") == "28" and _flag(seen[1:], "--max_prompts") == "1"


def test_geneval_samples_a_lora_run_s_folder_and_its_ema(fake_python, tmp_path):
    """A LoRA run exports ckpts/lora_<step>/ (no transformer_<step>.pt): the script passes that folder, and --use_ema
    goes to the sampler (which takes lora_<step>_ema/) with the EMA output folder."""
    (tmp_path / "run" / "ckpts" / "lora_20").mkdir(parents=True)
    proc, seen = fake_python("geneval_meanflow.sh", "run", "20", "--use_ema", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _flag(seen[1:], "--resume_path") == "run/ckpts/lora_20" and "--use_ema" in seen
    assert _flag(seen[1:], "--output_dir").endswith("/images/global_steps20_ema")
    (tmp_path / "run" / "ckpts" / "transformer_20.pt").touch()  # a full export of that step wins
    _, seen = fake_python("geneval_sCM.sh", "run", "20", cwd=tmp_path)
    assert _flag(seen[1:], "--resume_path") == "run/ckpts/transformer_20.pt"


@pytest.mark.parametrize("args,first_line", [
    (("run", "20", "two"), "error: NFE (argument 3) must be a positive integer, got 'two'"),
    (("run", "20", "2", "high"), "error: CFG (argument 4) must be a number, got 'high'"),
    (("run", "last"), "error: CKPT_ITER (2nd argument) must be the step number"),
])
def test_geneval_bad_positionals_are_one_line(fake_python, tmp_path, args, first_line):
    proc, seen = fake_python("geneval_sCM.sh", *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0].startswith(first_line), proc.stderr
    assert seen == [] and list(tmp_path.iterdir()) == [tmp_path / "fakepython"]  # nothing started or written


def test_relative_paths_of_a_real_run_resolve_against_the_callers_directory(tiny_assets, tmp_path):
    """`cd elsewhere && bash /repo/script/train_sCM.sh ... relout rel/rescaled.pt --data_dir reldata` trains
    into elsewhere/relout (it used to land in the repo)."""
    from model.loading import load_flux_transformer
    from training.checkpointing import export_transformer

    pipe, data = tiny_assets
    work = tmp_path / "work"
    (work / "rel").mkdir(parents=True)
    transformer = load_flux_transformer(str(pipe), 1.0)
    export_transformer(work / "rel" / "rescaled.pt", transformer.state_dict(), dict(transformer.config), 0)
    os.symlink(data, work / "reldata")
    cmd = ["bash", str(REPO_ROOT / "script" / "train_sCM.sh"), "1e-4", "32", "2", "relout", "rel/rescaled.pt",
           "--pretrained_model_name_or_path", str(pipe), "--data_dir", "reldata", "--max_train_steps", "1",
           "--checkpointing_steps", "1", "--report_to", "none"]
    proc = subprocess.run(cmd, cwd=work, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "relout" / "ckpts" / "transformer_1.pt").is_file()
    assert not (REPO_ROOT / "relout").exists()
