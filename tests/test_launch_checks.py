"""Misconfigured launches and suspicious training flags are refused with one line that names the fix, exit
status 2 and no output folder: process count vs accelerate's distributed type (both `accelerate launch` forms on
CPU), --ds_file without a launcher, a stale WORLD_SIZE, fp16 on CPU; and the non-finite stop's message."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from fault_injection import scm_argv, subprocess_env
from training.cli import run_cli
from training.common import TrainingError
from training.launch import check_launch_environment

TORCHRUN_ENV = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


class _Args:
    ds_file = None


def test_launch_environment_rules():
    check_launch_environment(_Args(), {})  # plain single process
    check_launch_environment(_Args(), TORCHRUN_ENV)  # torchrun / accelerate --multi_gpu
    with pytest.raises(TrainingError, match=r"^WORLD_SIZE=2 is set but RANK/LOCAL_RANK/MASTER_ADDR/MASTER_PORT are "
                                            r"not: no launcher started this process"):
        check_launch_environment(_Args(), {"WORLD_SIZE": "2"})
    ds = _Args()
    ds.ds_file = "ds.json"
    with pytest.raises(TrainingError, match=r"^--ds_file ds.json needs a distributed launcher"):
        check_launch_environment(ds, {})
    check_launch_environment(ds, TORCHRUN_ENV)
    with pytest.raises(TrainingError, match="--num_processes without --multi_gpu runs a single process"):
        check_launch_environment(_Args(), {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                                           "ACCELERATE_USE_CPU": "False"})


def _train_in_process(argv, capsys) -> tuple[int, str]:
    import train_sCM

    code = run_cli(lambda: train_sCM.main(argv))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return code, errors[0]


@pytest.mark.parametrize("case,first_line", [
    ("ds_file_without_launcher", "error: --ds_file {ds} needs a distributed launcher (DeepSpeed runs in a process "
                                 "group even for one process): launch with bash script/train_<method>.sh"),
    ("stale_world_size", "error: WORLD_SIZE=2 is set but RANK/LOCAL_RANK/MASTER_ADDR/MASTER_PORT are not"),
    ("fp16_on_cpu", "error: --mixed_precision fp16 needs a CUDA GPU"),
])
def test_misconfigured_single_process_runs(tiny_assets, tmp_path, capsys, monkeypatch, case, first_line):
    if case == "fp16_on_cpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("fp16 is valid with a GPU")
    pipe, data = tiny_assets
    ds = REPO_ROOT / "parallel_config" / "deepspeed_bf16_batch1.json"
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    flags = {"ds_file": ds} if case == "ds_file_without_launcher" else {}
    if case == "stale_world_size":
        monkeypatch.setenv("WORLD_SIZE", "2")
    if case == "fp16_on_cpu":
        flags["mixed_precision"] = "fp16"
    out = tmp_path / "run"
    code, error = _train_in_process(scm_argv(pipe, data, out, **flags), capsys)
    assert code == 2
    assert error.startswith(first_line.format(ds=ds)), error
    assert not out.exists()


def _accelerate_launch(pipe, data, out, *launch_flags) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_flags, "--num_processes", "2",
           "--main_process_port", str(29500 + os.getpid() % 2000), str(REPO_ROOT / "train_sCM.py"),
           *scm_argv(pipe, data, out, max_train_steps=1)]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)


def test_accelerate_launch_num_processes_without_multi_gpu_is_refused(tiny_assets, tmp_path):
    """accelerate starts one process for --num_processes 2 without --multi_gpu; it used to train alone, silently."""
    pipe, data = tiny_assets
    proc = _accelerate_launch(pipe, data, tmp_path / "run")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0
    assert errors == ["error: accelerate launch asked for several processes but started only this one (--num_processes "
                      "without --multi_gpu runs a single process): add --multi_gpu on GPUs, or launch with bash "
                      "script/train_<method>.sh (NPROC_PER_NODE=N), or torchrun --nproc_per_node N (with "
                      "ACCELERATE_USE_CPU=true on CPU), or accelerate launch --multi_gpu --num_processes N on GPUs."]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_launch_multi_gpu_on_cpu_is_refused(tiny_assets, tmp_path):
    """On CPU, --multi_gpu gives 2 processes with distributed type NO: two unsynchronised copies, now refused."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("with GPUs --multi_gpu is the right launch")
    pipe, data = tiny_assets
    proc = _accelerate_launch(pipe, data, tmp_path / "run", "--multi_gpu")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0
    assert errors and all(e.startswith("error: 2 processes run with accelerate's distributed type NO, so they would "
                                       "train 2 unsynchronised copies") for e in errors), proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_nonfinite_stop_does_not_call_exploded_weights_good(tiny_assets, tmp_path, capsys):
    """--learning_rate 1e8: step 1 is finite but explodes the weights, every later step is non-finite."""
    pipe, data = tiny_assets
    out = tmp_path / "run"
    code, error = _train_in_process(scm_argv(pipe, data, out, learning_rate=1e8, max_nonfinite_steps=3,
                                             max_train_steps=8, checkpointing_steps=100), capsys)
    assert code == 2
    assert error.startswith("error: 3 consecutive non-finite steps"), error
    assert "last good" not in error
    assert "the weights after the last finite update (step 1, max |weight| " in error
    largest = float(error.split("max |weight| ")[1].split(")")[0])
    assert largest > 1e6  # the exploded weights, as the message now says
    assert "restart from an earlier checkpoint or from scratch" in error
    assert (out / "checkpoints" / "checkpoint-1").is_dir()  # saved as promised, nothing else
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
