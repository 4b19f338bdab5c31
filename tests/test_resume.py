"""Exact resume: N steps + stop + resume + N steps == 2N steps straight, bit for bit (CPU, 1 and 2 processes).

Compared step by step: the loss and the learning rate of every step; at the end: the student weights
and the AdamW state (moments and step counts).  The stop is a real SIGTERM (in-process: sent to itself
during step N) or a checkpoint copied out of a longer run into a fresh folder (multi-process).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from fault_injection import (assert_same_weights, load_export, read_metrics, recording_method, scm_args, scm_argv,
                             scm_method, subprocess_env)
from training import checkpointing as ckpt
from training.core import ResumableSampler, TrainState, train


def _linear_lr(base: float, warmup: int, total: int, step: int) -> float:
    """diffusers' linear schedule after ``step`` scheduler steps (independent reference)."""
    if step < warmup:
        return base * step / max(1, warmup)
    return base * max(0.0, (total - step) / max(1, total - warmup))


def _optimizer_state(folder: Path) -> dict:
    return torch.load(folder / "optimizer.bin", map_location="cpu", weights_only=False)


def _assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        for name, value in a["state"][key].items():
            assert torch.equal(value, b["state"][key][name]), f"optimizer state {key}.{name} differs"


def test_sampler_shards_and_resumes_mid_epoch():
    full = ResumableSampler(20, batch_size=2, rank=0, world_size=2, seed=5)
    other = ResumableSampler(20, batch_size=2, rank=1, world_size=2, seed=5)
    order0, order1 = list(full), list(other)
    assert len(order0) == len(order1) == 10 and not set(order0) & set(order1)  # disjoint shards
    assert sorted(order0 + order1) == list(range(20))
    full.set_position(0, 3)
    assert list(full) == order0[6:] and len(full) == 4  # continues after 3 micro-batches
    full.set_position(1, 0)
    assert list(full) != order0  # a new permutation each epoch


@pytest.mark.parametrize("accumulation,batch,half", [(1, 4, 5), (2, 8, 2)])
def test_stop_resume_is_bitwise_identical_in_process(tiny_assets, tmp_path, capsys, accumulation, batch, half):
    """SIGTERM during step N; resume 'latest'; compare with 2N straight steps.  32 samples: with batch 4 the
    resumed part crosses an epoch boundary mid-way; with batch 8 and 2 micro-batches per step the stop lands
    exactly on an epoch boundary (and mid accumulation window when the signal arrives).  LR warm-up + linear
    decay makes every step's LR differ."""
    pipe, data = tiny_assets
    flags = dict(max_train_steps=2 * half, checkpointing_steps=100, lr_scheduler="linear", lr_warmup_steps=2,
                 gradient_accumulation_steps=accumulation, train_batch_size=batch)

    straight_args = scm_args(pipe, data, tmp_path / "straight", **flags)
    train(straight_args, scm_method(straight_args))

    handler_before = signal.getsignal(signal.SIGTERM)
    sent = []

    def sigterm_in_step_n(call, step):  # first micro-batch of step N (0-based step index N - 1)
        if step == half - 1 and not sent:
            sent.append(call)
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "stopped"
    args = scm_args(pipe, data, out, **flags)
    state = train(args, recording_method(scm_method(args), on_call=sigterm_in_step_n))
    assert sent and state.step == half  # the step in progress was finished, no further one started
    assert signal.getsignal(signal.SIGTERM) is handler_before  # handlers restored after train()
    assert "--resume_from_checkpoint latest" in capsys.readouterr().err
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [half]
    assert not (out / "ckpts" / f"transformer_{2 * half}.pt").exists()

    resumed_args = scm_args(pipe, data, out, resume_from_checkpoint="latest", **flags)
    state = train(resumed_args, scm_method(resumed_args))
    assert state.step == 2 * half and state.epoch >= 1

    ref, got = read_metrics(tmp_path / "straight"), read_metrics(out)
    assert sorted(got) == sorted(ref) == list(range(1, 2 * half + 1))
    for step in ref:
        assert got[step]["loss_sCM"] == ref[step]["loss_sCM"], f"loss differs at step {step}"
        assert got[step]["lr"] == ref[step]["lr"] == pytest.approx(_linear_lr(1e-4, 2, 2 * half, step), rel=1e-12)
    assert_same_weights(load_export(out, 2 * half), load_export(tmp_path / "straight", 2 * half))
    final = f"checkpoint-{2 * half}"
    _assert_same_optimizer(_optimizer_state(out / "checkpoints" / final),
                           _optimizer_state(tmp_path / "straight" / "checkpoints" / final))


def _torchrun(argv: list[str], nproc: int = 2, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={29500 + os.getpid() % 2000}", "train_sCM.py", *argv]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(ACCELERATE_USE_CPU="true", **env),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.distributed
def test_two_process_resume_is_bitwise_identical(tiny_assets, tmp_path):
    """2-process DDP: 6 steps straight vs. the same run's checkpoint-3 copied to a fresh folder and resumed.
    4 samples per rank per micro-batch, 4 micro-batches per epoch: the resumed part crosses an epoch."""
    pipe, data = tiny_assets
    flags = dict(max_train_steps=6, checkpointing_steps=3, lr_scheduler="linear", lr_warmup_steps=2)
    straight = tmp_path / "straight"
    _torchrun(scm_argv(pipe, data, straight, **flags))
    assert sorted(p.name for p in (straight / "checkpoints" / "checkpoint-3").glob("random_states_*.pkl")) == \
        ["random_states_0.pkl", "random_states_1.pkl"]

    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    _torchrun(scm_argv(pipe, data, resumed, resume_from_checkpoint="latest", **flags))

    ref, got = read_metrics(straight), read_metrics(resumed)
    assert sorted(ref) == list(range(1, 7)) and sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step]["loss_sCM"] == ref[step]["loss_sCM"], f"loss differs at step {step}"
    for step in ref:  # one scheduler step per update, not one per process
        assert ref[step]["lr"] == pytest.approx(_linear_lr(1e-4, 2, 6, step), rel=1e-12)
    assert_same_weights(load_export(resumed, 6), load_export(straight, 6))
    _assert_same_optimizer(_optimizer_state(resumed / "checkpoints" / "checkpoint-6"),
                           _optimizer_state(straight / "checkpoints" / "checkpoint-6"))
    state = TrainState()
    state.load_state_dict(torch.load(resumed / "checkpoints" / "checkpoint-6" / "custom_checkpoint_0.pkl",
                                     weights_only=False))
    assert (state.step, state.epoch, state.batches_in_epoch, state.samples_seen) == (6, 1, 2, 48)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_sigterm_to_one_rank_stops_both_and_resumes_exactly(tiny_assets, tmp_path):
    """SIGTERM to rank 1 only: the all-reduced flag stops both ranks after the same step; exit 0; exact resume."""
    import time

    from fault_injection import wait_for

    pipe, data = tiny_assets
    flags = dict(train_batch_size=2, max_train_steps=8, checkpointing_steps=100)
    straight = tmp_path / "straight"
    _torchrun(scm_argv(pipe, data, straight, **flags))

    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={29500 + os.getpid() % 2000}", "train_sCM.py", *scm_argv(pipe, data, out, **flags)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(faults={"slow_step": 0.5}, ACCELERATE_USE_CPU="true"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "logs" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, 240, "the first step", proc)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    rank1 = [pid for pid in ranks if "LOCAL_RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
             .replace("\0", " ")]
    assert len(rank1) == 1, ranks
    os.kill(int(rank1[0]), signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    stopped_at = max(read_metrics(out))
    assert 1 <= stopped_at < 8 and "--resume_from_checkpoint latest" in output
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [stopped_at]
    time.sleep(0.1)
    _torchrun(scm_argv(pipe, data, out, resume_from_checkpoint="latest", **flags))
    ref, got = read_metrics(straight), read_metrics(out)
    assert [got[s]["loss_sCM"] for s in ref] == [ref[s]["loss_sCM"] for s in ref]
    assert_same_weights(load_export(out, 8), load_export(straight, 8))


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_resume_is_bitwise_identical(tiny_assets, tmp_path):
    """DeepSpeed ZeRO-2 (bf16, 1 process on CPU): resume from a copied checkpoint gives the same steps."""
    pipe, data = tiny_assets
    ds = dict(ds_file=REPO_ROOT / "parallel_config" / "deepspeed_bf16_batch1.json", max_train_steps=6,
              checkpointing_steps=3)
    env = dict(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(REPO_ROOT / ".cache" / "torch_extensions"))

    def run(argv):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
               f"--master_port={29500 + os.getpid() % 2000}", "train_sCM.py", *argv]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(**env), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(scm_argv(pipe, data, straight, **ds))
    shutil.copytree(straight / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    run(scm_argv(pipe, data, resumed, resume_from_checkpoint="latest", **ds))
    ref, got = read_metrics(straight), read_metrics(resumed)
    assert sorted(got) == [4, 5, 6]
    assert [got[s]["loss_sCM"] for s in got] == [ref[s]["loss_sCM"] for s in got]
    assert_same_weights(load_export(resumed, 6), load_export(straight, 6))
