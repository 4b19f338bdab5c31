"""Runs that survive: preemption, kill -9 during a save, full disk, bad data, bad numbers, bad setup.

Every recovery is checked against an uninterrupted reference run of the same configuration: after the
fault and a ``--resume_from_checkpoint latest``, losses of every step and the final weights must be
bit-identical to the reference (no data lost, no step repeated or skipped).
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from fault_injection import (assert_same_weights, load_export, read_events, read_exits, read_metrics, recording_method,
                             scm_args, scm_argv, scm_method, signal_group_after_steps, start_in_own_group,
                             subprocess_env, tree_digest, wait_for)
from training import checkpointing as ckpt
from training.common import TrainingError
from training.core import ResumableSampler, TrainState, train
from training.scm import SCMMethod

STEPS = 6  # the reference run: 6 steps, a checkpoint every 2 (see fault_injection.scm_argv)


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory) -> Path:
    """An uninterrupted run of the default tiny configuration."""
    pipe, data = tiny_assets
    out = tmp_path_factory.mktemp("reference") / "run"
    args = scm_args(pipe, data, out)
    train(args, scm_method(args))
    return out


def _resume_and_compare(tiny_assets, out: Path, reference: Path, **flags) -> None:
    pipe, data = tiny_assets
    args = scm_args(pipe, data, out, resume_from_checkpoint="latest", **flags)
    state = train(args, scm_method(args))
    assert state.step == STEPS
    ref, got = read_metrics(reference), read_metrics(out)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    assert [got[s]["loss_sCM"] for s in ref] == [ref[s]["loss_sCM"] for s in ref]
    assert_same_weights(load_export(out, STEPS), load_export(reference, STEPS))
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary folders left behind: {leftovers}"


def _spawn(tiny_assets, out: Path, faults: dict, marker: Path | None = None, **flags) -> subprocess.Popen:
    pipe, data = tiny_assets
    cmd = [sys.executable, "train_sCM.py", *scm_argv(pipe, data, out, **flags)]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(faults, marker), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


# ---------------------------------------------------------------------------------------------
# Preemption and kill -9
# ---------------------------------------------------------------------------------------------

def test_sigterm_saves_exits_zero_and_resumes_exactly(tiny_assets, tmp_path, reference):
    """A real SIGTERM from outside, at whatever point of a step it lands (steps slowed to ~0.6 s)."""
    out = tmp_path / "run"
    proc = _spawn(tiny_assets, out, {"slow_step": 0.5})
    metrics = out / "logs" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, 120, "the first step", proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    stopped_at = max(read_metrics(out))
    assert 1 <= stopped_at < STEPS
    assert "--resume_from_checkpoint latest" in output and f"step {stopped_at}" in output
    assert ckpt.list_checkpoints(out)[-1][0] == stopped_at  # the stop saved its step, periodic or not
    assert [e["event"] for e in read_events(out)][-1] == "stopped"
    _resume_and_compare(tiny_assets, out, reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                 pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)], ids=lambda s: s.name)
def test_process_group_signal_with_dataloader_workers(tiny_assets, tmp_path, reference, sig):
    """``kill -SIG -- -PGID``, as schedulers and Ctrl-C deliver it: the trainer *and* its 2 DataLoader workers
    get the signal.  The workers must not die of it (they used to, and the run crashed without a
    checkpoint): the step finishes, its checkpoint is written, exit 0, and the resume is exact."""
    pipe, data = tiny_assets
    out, exits = tmp_path / "run", tmp_path / "exits"
    cmd = [sys.executable, "train_sCM.py", *scm_argv(pipe, data, out, dataloader_num_workers=2)]
    proc = start_in_own_group(cmd, subprocess_env({"slow_step": 0.5, "record_exit": str(exits)}))
    output, _ = signal_group_after_steps(proc, out, sig)
    assert proc.returncode == 0 and read_exits(exits) == {0: 0}, output[-3000:]
    assert "DataLoader worker" not in output
    for notice in ("requires torchvision", "should be kept in float32"):  # quiet start-up: no third-party notices
        assert notice not in output
    stopped_at = max(read_metrics(out))
    assert 1 <= stopped_at < STEPS
    assert f"Stopped by {signal.Signals(sig).name} at step {stopped_at}" in output
    assert "--resume_from_checkpoint latest" in output
    assert ckpt.list_checkpoints(out)[-1][0] == stopped_at
    _resume_and_compare(tiny_assets, out, reference)


@pytest.mark.parametrize("where", [
    "save_state",
    pytest.param("export", marks=pytest.mark.slow),
    pytest.param("rename", marks=pytest.mark.slow),
    pytest.param("prune", marks=pytest.mark.slow),
])
def test_kill_9_during_save_leaves_latest_complete_checkpoint(tiny_assets, tmp_path, reference, where):
    """SIGKILL while step 4 is being saved: checkpoint-2 (or, once renamed, checkpoint-4) stays loadable and
    the run resumes to exactly the reference result."""
    out, marker = tmp_path / "run", tmp_path / "stalled"
    limit = {"checkpoints_total_limit": 1} if where == "prune" else {}
    proc = _spawn(tiny_assets, out, {"stall": {"step": 4, "at": where}}, marker, **limit)
    wait_for(marker.exists, 120, f"the stall point {where!r}", proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    complete = [step for step, _ in ckpt.list_checkpoints(out)]
    hidden = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("."))
    if where == "prune":
        assert complete == [4] and hidden == [".checkpoint-2.old"]
    else:
        assert complete == [2] and hidden == [".checkpoint-4.tmp"]
        assert (out / "ckpts" / "transformer_4.pt").exists() == (where == "rename")
        if where == "export":
            assert (out / "ckpts" / ".transformer_4.pt.tmp").stat().st_size > 0  # the half-written file
    latest = ckpt.resolve_resume_path(str(out), "latest")
    assert latest == out / "checkpoints" / f"checkpoint-{complete[-1]}"
    assert_same_weights(load_export(out, complete[-1]), load_export(reference, complete[-1]))
    _resume_and_compare(tiny_assets, out, reference, **limit)
    if where == "prune":
        assert [s for s, _ in ckpt.list_checkpoints(out)] == [STEPS]


# ---------------------------------------------------------------------------------------------
# Full disk
# ---------------------------------------------------------------------------------------------

def _expect_failed_save(tiny_assets, out: Path, reference: Path, before: dict, **flags) -> str:
    pipe, data = tiny_assets
    args = scm_args(pipe, data, out, **flags)
    with pytest.raises(TrainingError) as info:
        train(args, scm_method(args))
    message = str(info.value)
    assert "could not save the checkpoint of step 4" in message and "checkpoint-2" in message
    assert "resume_from_checkpoint latest" in message
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # temp folder removed
    assert tree_digest(out / "checkpoints" / "checkpoint-2") == before["checkpoint"]
    assert ckpt.export_path(out, 2).read_bytes() == before["export"]
    assert not ckpt.export_path(out, 4).exists()
    return message


def test_disk_full_during_save_keeps_previous_checkpoints(tiny_assets, tmp_path, reference, monkeypatch):
    """The optimizer file of step 4 lands on /dev/full: a real ENOSPC from the kernel, on torch.save's own
    write path (which reports it as an obscure RuntimeError)."""
    out = tmp_path / "run"
    before = {}
    real_begin = ckpt.begin_checkpoint

    def begin_with_full_disk(output_dir, step):
        tmp = real_begin(output_dir, step)
        if step == 4:
            before["checkpoint"] = tree_digest(Path(output_dir) / "checkpoints" / "checkpoint-2")
            before["export"] = ckpt.export_path(output_dir, 2).read_bytes()
            (tmp / "optimizer.bin").symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(ckpt, "begin_checkpoint", begin_with_full_disk)
    _expect_failed_save(tiny_assets, out, reference, before)
    monkeypatch.undo()
    _resume_and_compare(tiny_assets, out, reference)


def test_really_full_disk(tiny_assets, tmp_path, reference):
    """The run folder on a tmpfs sized for one checkpoint: the second save hits a real ENOSPC."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    size_kib = (sum(p.stat().st_size for p in (reference / "checkpoints" / "checkpoint-2").iterdir())
                + ckpt.export_path(reference, 2).stat().st_size) // 1024 + 700
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        out = mount / "run"
        pipe, data = tiny_assets
        args = scm_args(pipe, data, out)
        with pytest.raises(TrainingError) as info:
            train(args, scm_method(args))
        assert "could not save the checkpoint of step 4" in str(info.value)
        assert "MiB free on that disk" in str(info.value)
        assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
        kept, ref = (tree_digest(run / "checkpoints" / "checkpoint-2") for run in (out, reference))
        kept.pop("run_config.json"), ref.pop("run_config.json")  # they differ in output_dir only
        assert kept == ref
        rescue = tmp_path / "rescue"  # free space elsewhere: move the run and resume it
        shutil.copytree(out, rescue)
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    _resume_and_compare(tiny_assets, rescue, reference)


# ---------------------------------------------------------------------------------------------
# Bad numbers
# ---------------------------------------------------------------------------------------------

def _optimizer_steps(out: Path, step: int) -> set[float]:
    saved = torch.load(out / "checkpoints" / f"checkpoint-{step}" / "optimizer.bin", weights_only=False)
    return {float(s["step"]) for s in saved["state"].values()}


def test_nan_teacher_output_skips_update(tiny_assets, tmp_path):
    """NaN in the teacher output on 2 micro-batches: no weight change, counted, logged, training goes on."""
    pipe, data = tiny_assets
    out = tmp_path / "run"
    args = scm_args(pipe, data, out, max_train_steps=4, checkpointing_steps=4, max_nonfinite_steps=3)
    method = recording_method(scm_method(args), nan_teacher_calls={2, 3})
    state = train(args, method)

    steps = [step for _, step, _ in method.records]
    assert steps == [0, 1, 2, 2, 2, 3]  # calls 2 and 3 did not advance the step
    w = [weights for _, _, weights in method.records]
    assert_same_weights(w[2], w[3])
    assert_same_weights(w[3], w[4])
    with pytest.raises(AssertionError):
        assert_same_weights(w[1], w[2])  # a real step does change the weights
    assert (state.step, state.skipped_nonfinite, state.consecutive_nonfinite) == (4, 2, 0)
    skips = [e for e in read_events(out) if e["event"] == "nonfinite_skip"]
    assert [e["consecutive"] for e in skips] == [1, 2]
    assert all(e["terms"][0] == "teacher_velocity" for e in skips)
    metrics = read_metrics(out)
    assert sorted(metrics) == [1, 2, 3, 4] and metrics[4]["skipped_nonfinite"] == 2
    assert _optimizer_steps(out, 4) == {4.0}  # AdamW's step count (bias correction) skipped them too


def test_consecutive_nan_saves_and_stops_with_diagnostic(tiny_assets, tmp_path):
    pipe, data = tiny_assets
    out = tmp_path / "run"
    args = scm_args(pipe, data, out, max_train_steps=6, checkpointing_steps=100, max_nonfinite_steps=3)
    method = recording_method(scm_method(args), nan_teacher_from=2)
    with pytest.raises(TrainingError) as info:
        train(args, method)
    message = str(info.value)
    assert "3 consecutive non-finite steps" in message and "teacher_velocity" in message
    assert "checkpoint-2" in message
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]  # saved although no periodic save was due
    last_good = method.records[2][2]  # the student's weights after step 2 (parameter names of TrigFlowFlux)
    export = load_export(out, 2)
    as_export = {k.removeprefix("transformer."): v for k, v in last_good.items()}
    assert as_export.keys() <= export.keys()
    assert_same_weights({k: export[k] for k in as_export}, as_export)
    assert_same_weights(method.records[4][2], last_good)


def test_nan_gradient_or_nan_loss_alone_skips_update(tiny_assets, tmp_path):
    """Call 1: finite loss, NaN gradient.  Call 3: NaN loss whose gradients are all finite (a NaN constant):
    an optimizer would happily apply those gradients, so the loss check alone must skip the update."""
    pipe, data = tiny_assets
    out = tmp_path / "run"
    args = scm_args(pipe, data, out, max_train_steps=3, checkpointing_steps=3)
    method = recording_method(scm_method(args), nan_grad_calls={1}, nan_loss_calls={3})
    state = train(args, method)
    assert [step for _, step, _ in method.records] == [0, 1, 1, 2, 2]
    assert_same_weights(method.records[1][2], method.records[2][2])
    assert_same_weights(method.records[3][2], method.records[4][2])
    assert state.skipped_nonfinite == 2
    assert [e["terms"] for e in read_events(out) if e["event"] == "nonfinite_skip"] == [["gradients"], ["loss"]]
    assert all(torch.isfinite(v).all() for v in load_export(out, 3).values())


# ---------------------------------------------------------------------------------------------
# Bad data
# ---------------------------------------------------------------------------------------------

BAD_ROWS = {3: "truncated", 7: "empty image file (0 bytes)", 12: "empty caption", 18: "image file not found"}


@pytest.fixture(scope="module")
def bad_dataset(tiny_assets, tmp_path_factory) -> Path:
    """20 rows of JPEG files + captions (jsonl); rows 3, 7, 12, 18 are broken as listed in BAD_ROWS."""
    import pyarrow.parquet as pq

    _, data = tiny_assets
    rows = pq.read_table(data / "train.parquet").slice(0, 20).to_pylist()
    root = tmp_path_factory.mktemp("bad_data")
    (root / "images").mkdir()
    lines = []
    for i, row in enumerate(rows):
        name = f"images/{i:03d}.jpg"
        buffer = io.BytesIO()
        Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB").save(buffer, "JPEG", quality=90)
        jpeg = buffer.getvalue()
        if i == 3:
            jpeg = jpeg[: len(jpeg) // 2]  # a corrupt (truncated) JPEG
        elif i == 7:
            jpeg = b""  # a zero-byte file
        if i != 18:  # 18: a file that does not exist
            (root / name).write_bytes(jpeg)
        lines.append({"image": name, "llava": "" if i == 12 else row["llava"]})
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def _seed_with_all_bad_batch(batch: int = 4) -> tuple[int, int]:
    """A seed whose first epoch has a micro-batch made only of bad rows (not the first micro-batch)."""
    for seed in range(100_000):
        order = ResumableSampler(20, batch, 0, 1, seed).epoch_order(0)
        for b in range(1, 20 // batch):
            if set(order[b * batch:(b + 1) * batch]) == set(BAD_ROWS):
                return seed, b
    raise AssertionError("no such seed")


def _bad_data_args(tiny_assets, bad_dataset, out, **flags):
    pipe, _ = tiny_assets
    seed, _ = _seed_with_all_bad_batch()
    return scm_args(pipe, None, out, data_dir=bad_dataset, data_files="train.jsonl", seed=seed, **flags)


def test_bad_samples_are_skipped_counted_and_logged(tiny_assets, bad_dataset, tmp_path):
    """A corrupt JPEG, a zero-byte file, an empty caption and a missing file: one epoch trains through them,
    including a micro-batch made only of them (replaced by a readable sample, so every step is a real update)."""
    out = tmp_path / "run"
    args = _bad_data_args(tiny_assets, bad_dataset, out, max_train_steps=5, checkpointing_steps=2,
                          max_bad_sample_fraction=0.25, checkpoints_total_limit=1)
    method = recording_method(scm_method(args))
    state = train(args, method)
    assert state.step == 5 and len(method.records) == 5 and state.epoch == 0
    assert (state.bad_indices, state.bad_samples, state.samples_seen) == (sorted(BAD_ROWS), 4, 20)
    events = read_events(out)
    logged = {e["index"]: e["reason"] for e in events if e["event"] == "bad_sample"}
    assert logged.keys() == BAD_ROWS.keys()
    for index, reason in BAD_ROWS.items():
        assert reason in logged[index], logged[index]
    substituted = [e for e in events if e["event"] == "substituted_batch"]
    assert len(substituted) == 1 and sorted(substituted[0]["bad_indices"]) == sorted(BAD_ROWS)
    for (_, _, before), (_, _, after) in zip(method.records, method.records[1:]):
        with pytest.raises(AssertionError):
            assert_same_weights(before, after)
    # --checkpoints_total_limit 1 pruned the full checkpoints, never the exports.
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [5]
    assert sorted(p.name for p in (out / "ckpts").iterdir()) == [f"transformer_{s}.pt" for s in (2, 4, 5)]


def test_too_many_bad_samples_stop_with_clear_error(tiny_assets, bad_dataset, tmp_path):
    out = tmp_path / "run"
    args = _bad_data_args(tiny_assets, bad_dataset, out, max_train_steps=5, checkpointing_steps=100,
                          max_bad_sample_fraction=0.15)
    with pytest.raises(TrainingError) as info:
        train(args, scm_method(args))
    assert "4 of the 20 dataset samples are unreadable" in str(info.value)
    assert "--max_bad_sample_fraction 0.15" in str(info.value)
    _, bad_batch = _seed_with_all_bad_batch()
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [bad_batch + 1]  # saved before stopping


@pytest.mark.parametrize("case,expected", [
    ("no_caption_column", "caption column 'llava' not found"),
    ("text_in_image_column", "none of the 8 dataset samples checked can be used"),
    ("empty", "has 0 rows"),
])
def test_bad_dataset_fails_up_front(tiny_assets, tmp_path, case, expected):
    pipe, data = tiny_assets
    folder = tmp_path / "data"
    folder.mkdir()
    flags = {}
    if case == "no_caption_column":
        (folder / "train.jsonl").write_text(json.dumps({"image": "a.jpg", "text": "a caption"}) + "\n")
    elif case == "text_in_image_column":
        folder, flags = data, {"image_column": "llava"}
    else:
        (folder / "train.jsonl").write_text("")
    out = tmp_path / "run"
    args = scm_args(pipe, folder, out, **flags)
    with pytest.raises(ValueError, match=expected):
        train(args, scm_method(args))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Bad setup
# ---------------------------------------------------------------------------------------------

def _unwritable_locations(tmp_path: Path) -> list[Path]:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    places = [blocker / "run"]
    try:  # /sys refuses new files even to root, although os.access(W_OK) says yes there
        fd, probe = tempfile.mkstemp(dir="/sys")
        os.close(fd)
        os.unlink(probe)
    except OSError:
        places.append(Path("/sys/t2i-distill-test/run"))
    return places


def test_unwritable_output_dir_fails_up_front(tiny_assets, tmp_path):
    pipe, data = tiny_assets
    for out in _unwritable_locations(tmp_path):
        args = scm_args(pipe, data, out)
        with pytest.raises(PermissionError, match="--output_dir"):
            train(args, scm_method(args))
        assert not out.exists()


@pytest.fixture
def finished_run(reference, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


class _OtherMethod(SCMMethod):
    name = "MeanFlow"


@pytest.mark.parametrize("change,field", [
    ({"resolution": 64}, "resolution"),
    ({"_method": _OtherMethod}, "method"),
    ({"_symlink_model": True}, "pretrained_model_name_or_path"),
    ({"train_batch_size": 2}, "train_batch_size"),
])
def test_resume_with_different_config_is_refused(tiny_assets, finished_run, tmp_path, change, field):
    pipe, data = tiny_assets
    before = tree_digest(finished_run)
    change = dict(change)
    method_cls = change.pop("_method", None)
    if change.pop("_symlink_model", False):
        (tmp_path / "same_model_elsewhere").symlink_to(pipe)
        pipe = tmp_path / "same_model_elsewhere"
    args = scm_args(pipe, data, finished_run, resume_from_checkpoint="latest", max_train_steps=8, **change)
    method = scm_method(args)
    if method_cls is not None:
        method = method_cls(method.loss_fn, method.jvp_attention)
    with pytest.raises(ValueError, match=f"cannot resume .*{field}: checkpoint"):
        train(args, method)
    assert tree_digest(finished_run) == before  # checkpoints, exports and logs untouched


def test_fresh_run_into_a_used_folder_is_refused(tiny_assets, finished_run):
    pipe, data = tiny_assets
    before = tree_digest(finished_run)
    args = scm_args(pipe, data, finished_run)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(args, scm_method(args))
    args = scm_args(pipe, data, finished_run, resume_from_checkpoint=finished_run / "ckpts")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint folder"):
        train(args, scm_method(args))
    assert tree_digest(finished_run) == before


def test_resume_of_a_finished_run_does_nothing(tiny_assets, finished_run):
    pipe, data = tiny_assets
    before = tree_digest(finished_run / "checkpoints")
    args = scm_args(pipe, data, finished_run, resume_from_checkpoint="latest")
    state = train(args, scm_method(args))
    assert state.step == STEPS
    assert tree_digest(finished_run / "checkpoints") == before


def test_disk_error_helpers_are_atomic(tmp_path, monkeypatch):
    """atomic_torch_save leaves neither the target nor a temp file when the write fails half-way."""
    target = tmp_path / "ckpts" / "transformer_1.pt"
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.export_transformer(target, {"w": torch.ones(2)}, {}, 1)
    assert list(target.parent.iterdir()) == []
    monkeypatch.setattr(torch, "save", real_save)
    ckpt.export_transformer(target, {"w": torch.ones(2)}, {"a": 1}, 1)
    assert torch.load(target, weights_only=True)["module"]["w"].tolist() == [1.0, 1.0]
    state = TrainState(step=3, bad_indices=[1])
    fresh = TrainState()
    fresh.load_state_dict({**state.state_dict(), "unknown_future_field": 1})
    assert fresh == state


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_skips_nonfinite_steps(tiny_assets, tmp_path):
    """Under DeepSpeed ZeRO-2 (bf16) the engine steps inside backward; a NaN teacher output must still leave
    the weights untouched: after 1 good step and 2 NaN steps the saved weights equal a clean 1-step run's."""
    pipe, data = tiny_assets
    ds = dict(ds_file=REPO_ROOT / "parallel_config" / "deepspeed_bf16_batch1.json", checkpointing_steps=100)
    env = dict(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(REPO_ROOT / ".cache" / "torch_extensions"))

    def run(out, faults=None, **flags):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
               f"--master_port={29500 + os.getpid() % 2000}", "train_sCM.py",
               *scm_argv(pipe, data, out, **ds, **flags)]
        return subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(faults, **env), capture_output=True, text=True,
                              timeout=600)

    clean = run(tmp_path / "clean", max_train_steps=1)
    assert clean.returncode == 0, clean.stderr[-3000:]
    nan = run(tmp_path / "nan", {"nan_teacher_from": 1}, max_train_steps=6, max_nonfinite_steps=2)
    assert nan.returncode != 0 and "exitcode  : 2" in nan.stderr, nan.stderr[-3000:]  # torchrun reports the 2
    assert "2 consecutive non-finite steps" in nan.stderr and "teacher_velocity" in nan.stderr
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "nan")] == [1]
    assert_same_weights(load_export(tmp_path / "nan", 1), load_export(tmp_path / "clean", 1))
    assert [e["consecutive"] for e in read_events(tmp_path / "nan") if e["event"] == "nonfinite_skip"] == [1, 2]
