"""EMA of the student (training/ema.py): the update against its closed form, in a real run, across a resume
bit for bit, without touching the loss sequence, and under DeepSpeed ZeRO-2 (slow)."""
from __future__ import annotations

import os
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO_ROOT
from fault_injection import (DEEPSPEED_CPU_ENV, load_export, read_metrics, recording_method, scm_args, scm_argv,
                             scm_method, torchrun)
from training.core import train
from training.ema import EMA
from training.hooks import Update


def _closed_form_weights(n: int, decay: float, power: float | None) -> list[float]:
    """Weight of θ_k, k = 0..n, in θ̄_n.  Constant β: w_0 = β^n, w_k = (1 − β)β^(n−k).  Power γ: the
    product Π_{j=k+1..n} (1 − 1/j)^(γ+1) telescopes to (k/n)^(γ+1), so w_k = (k^(γ+1) − (k−1)^(γ+1)) / n^(γ+1)."""
    if power is None:
        return [decay ** n] + [(1 - decay) * decay ** (n - k) for k in range(1, n + 1)]
    e = power + 1
    return [0.0] + [(k ** e - (k - 1) ** e) / n ** e for k in range(1, n + 1)]


@pytest.mark.parametrize("decay,power", [(0.7, None), (0.9999, 2.0), (0.9999, 0.0)])
def test_ema_update_equals_closed_form(decay, power):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # frozen tensors are neither averaged nor replaced in the export
    run = SimpleNamespace(unwrapped=model, main=True, state=SimpleNamespace(step=0))
    ema = EMA(decay, power)
    ema.on_train_start(run)
    history = [model.weight.detach().double().clone()]
    for step in range(1, 7):
        with torch.no_grad():
            model.weight.copy_(torch.randn_like(model.weight))
        history.append(model.weight.detach().double().clone())
        ema.on_update(run, Update(step, None, None, 0.0, 0.0))
        weights = _closed_form_weights(step, decay, power)
        assert sum(weights) == pytest.approx(1.0)
        expected = sum(w * h for w, h in zip(weights, history))
        torch.testing.assert_close(ema.shadow["weight"].double(), expected, rtol=1e-6, atol=1e-6)
    assert set(ema.shadow) == {"weight"}


def test_ema_export_keeps_raw_frozen_tensors_and_names():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    method = SimpleNamespace(export_state_dict=lambda m: ({f"renamed.{k}": v for k, v in m.state_dict().items()}, {}))
    run = SimpleNamespace(unwrapped=model, main=True, state=SimpleNamespace(step=0), method=method)
    ema = EMA(0.5)
    ema.on_train_start(run)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.on_update(run, Update(1, None, None, 0.0, 0.0))
    state, _ = ema.export_state_dict(run)
    assert torch.equal(state["renamed.weight"], model.weight.detach() - 0.5)
    assert state["renamed.bias"] is not None and torch.equal(state["renamed.bias"], model.bias.detach())


def _trainable_export_keys(records_weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """Recorded parameter names (``transformer.x``, ``logvar_linear.y``) → sCM export keys (``x``, ``logvar_linear.y``)."""
    return {name: name.removeprefix("transformer.") for name in records_weights}


def test_ema_in_training_matches_closed_form_survives_resume_and_leaves_losses_alone(tiny_assets, tmp_path):
    """4 steps with EMA vs the same without: same losses and raw weights; the EMA export equals the closed form of
    the recorded weights; resuming the EMA run from its step-2 checkpoint gives the same EMA bit for bit."""
    pipe, data = tiny_assets
    flags = dict(max_train_steps=4, checkpointing_steps=2)
    plain_args = scm_args(pipe, data, tmp_path / "plain", **flags)
    train(plain_args, scm_method(plain_args))

    ema_flags = dict(flags, use_ema=True, ema_decay=0.6)
    out = tmp_path / "ema"
    args = scm_args(pipe, data, out, **ema_flags)
    method = recording_method(scm_method(args))
    train(args, method)

    ref, got = read_metrics(tmp_path / "plain"), read_metrics(out)
    assert [got[s]["loss_sCM"] for s in sorted(got)] == [ref[s]["loss_sCM"] for s in sorted(ref)]
    raw = load_export(out, 4)
    assert all(torch.equal(raw[k], v) for k, v in load_export(tmp_path / "plain", 4).items())

    ema_export = torch.load(out / "ckpts" / "transformer_4_ema.pt", map_location="cpu", weights_only=True)
    assert ema_export["step"] == 4 and ema_export["config"] == torch.load(
        out / "ckpts" / "transformer_4.pt", map_location="cpu", weights_only=True)["config"]
    ema = ema_export["module"]
    assert ema.keys() == raw.keys()
    history = [weights for _, _, weights in method.records]  # θ_0..θ_3 (before each step's update)
    names = _trainable_export_keys(history[0])
    history.append({n: raw[k] for n, k in names.items()})  # θ_4
    weights = _closed_form_weights(4, 0.6, None)
    changed = 0
    for name, key in names.items():
        expected = sum(w * h[name].double() for w, h in zip(weights, history))
        torch.testing.assert_close(ema[key].double(), expected, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(ema[key], raw[key])
    assert changed > 0
    assert (out / "ckpts" / "transformer_2_ema.pt").is_file()

    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    resumed_args = scm_args(pipe, data, resumed, resume_from_checkpoint="latest", **ema_flags)
    train(resumed_args, scm_method(resumed_args))
    resumed_ema = torch.load(resumed / "ckpts" / "transformer_4_ema.pt", map_location="cpu", weights_only=True)["module"]
    different = [k for k in ema if not torch.equal(ema[k], resumed_ema[k])]
    assert not different, f"EMA differs after resume: {different[:3]}"
    got = read_metrics(resumed)
    assert [got[s]["loss_sCM"] for s in (3, 4)] == [ref[s]["loss_sCM"] for s in (3, 4)]


@pytest.mark.slow
@pytest.mark.distributed
def test_ema_under_deepspeed_zero2_resumes_exactly(tiny_assets, tmp_path):
    """DeepSpeed ZeRO-2 bf16 (1 CPU process): the EMA reads the engine's full parameters, exports in their dtype,
    and a resume from the step-2 checkpoint reproduces the step-4 EMA bit for bit; validation images sample
    the bf16 student there."""
    pipe, data = tiny_assets
    flags = dict(ds_file=REPO_ROOT / "parallel_config" / "deepspeed_bf16_batch1.json", max_train_steps=4,
                 checkpointing_steps=2, use_ema=True, ema_power=1.0,
                 validation_prompt="a red square", validation_steps=4, num_validation_images=1)  # bf16 sampling too
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun(scm_argv(pipe, data, straight, **flags), **DEEPSPEED_CPU_ENV)
    shutil.copytree(straight / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    torchrun(scm_argv(pipe, data, resumed, resume_from_checkpoint="latest", **flags), **DEEPSPEED_CPU_ENV)
    a = torch.load(straight / "ckpts" / "transformer_4_ema.pt", map_location="cpu", weights_only=True)["module"]
    b = torch.load(resumed / "ckpts" / "transformer_4_ema.pt", map_location="cpu", weights_only=True)["module"]
    raw = load_export(straight, 4)
    assert a.keys() == b.keys() == raw.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(a[k].dtype == raw[k].dtype for k in a)
    assert any(not torch.equal(a[k], raw[k]) for k in a)  # power 1 averages over the run: not the last weights
    assert (straight / "validation" / "step_0000004.png").is_file() and (resumed / "validation" / "step_0000004.png").is_file()


def test_sampling_cli_use_ema_loads_the_ema_export(tiny_assets, tmp_path, monkeypatch):
    """--use_ema samples transformer_<step>_ema.pt: images differ from the raw export's and equal those of passing
    the EMA file itself; without an EMA file beside the export it is a one-line error."""
    import numpy as np
    from PIL import Image

    from model.loading import load_flux_transformer
    from model.sampling_cli import main
    from training.checkpointing import ema_export_path, export_path, export_transformer

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    pipe_dir, _ = tiny_assets
    tf = load_flux_transformer(str(pipe_dir), 1.0)
    raw = dict(tf.state_dict())
    raw["logvar_linear.weight"], raw["logvar_linear.bias"] = torch.zeros(1, tf.inner_dim), torch.zeros(1)
    torch.manual_seed(1)
    ema = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in raw.items()}
    run = tmp_path / "run"
    export_transformer(export_path(run, 5), raw, dict(tf.config), 5)
    export_transformer(ema_export_path(run, 5), ema, dict(tf.config), 5)

    def sample(out, *flags):
        main("scm", ["--pretrained_model_name_or_path", str(pipe_dir), "--output_dir", str(tmp_path / out),
                     "--prompt", "a red square", "--n_samples", "1", "--resolution", "32", "--max_sequence_length",
                     "16", "--no_progress", *flags])
        return np.asarray(Image.open(tmp_path / out / "00000" / "samples" / "0000.png"))

    with_flag = sample("flag", "--resume_path", str(export_path(run, 5)), "--use_ema")
    direct = sample("direct", "--resume_path", str(ema_export_path(run, 5)))
    plain = sample("raw", "--resume_path", str(export_path(run, 5)))
    assert np.array_equal(with_flag, direct)
    assert not np.array_equal(with_flag, plain)

    ema_export_path(run, 5).unlink()
    with pytest.raises(FileNotFoundError, match="only runs trained with --use_ema"):
        sample("missing", "--resume_path", str(export_path(run, 5)), "--use_ema")
    assert not (tmp_path / "missing").exists()


def test_geneval_script_passes_use_ema_into_its_own_folder(tmp_path):
    """script/geneval_sCM.sh RUN 20 --use_ema → test_sCM.py --use_ema, images under .../global_steps20_ema."""
    fake = tmp_path / "fakepython"
    fake.write_text('#!/bin/sh\ncase "$*" in *device_count*) echo 0; exit 0;; esac\nprintf "%s\\n" "$@" > "$RECORD"\n')
    fake.chmod(0o755)
    record = tmp_path / "argv.txt"
    proc = subprocess.run(["bash", str(REPO_ROOT / "script" / "geneval_sCM.sh"), "run", "20", "--use_ema"],
                          cwd=tmp_path, env={**os.environ, "PYTHON": str(fake), "RECORD": str(record)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = record.read_text().splitlines()
    assert "--use_ema" in argv
    assert argv[argv.index("--resume_path") + 1] == "run/ckpts/transformer_20.pt"
    assert argv[argv.index("--output_dir") + 1].endswith("/images/global_steps20_ema")


def test_exports_total_limit_prunes_the_ema_exports_with_their_raw_ones(tmp_path):
    from training.checkpointing import ema_export_path, export_path, prune_exports

    for step in (2, 4, 6):
        for path in (export_path(tmp_path, step), ema_export_path(tmp_path, step)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
    prune_exports(tmp_path, keep=2)
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == [
        "transformer_4.pt", "transformer_4_ema.pt", "transformer_6.pt", "transformer_6_ema.pt"]

