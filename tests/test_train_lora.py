"""LoRA and streaming runs through the real trainers (train_sCM.py / train_meanflow.py / train_rescale.py flags).

References: a freshly loaded copy of the pipeline's transformer (the frozen base must be unchanged), the
straight run of the same flags (resume bit for bit), and the map-style run's data (streaming).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO_ROOT
from fault_injection import DEEPSPEED_CPU_ENV, read_metrics, scm_args, scm_argv, scm_method, torchrun
from model.lora import HEADS_WEIGHTS, LORA_WEIGHTS
from training.core import train

LORA = dict(lora_rank=4, lora_alpha=4)


class _Keep:
    """Wrap a method to keep the student module it builds (in-process inspection after train())."""

    def __init__(self, method):
        self.__dict__.update(method.__dict__)
        self._method = method
        self.name = method.name
        self.student = None

    def __getattr__(self, name):
        return getattr(self._method, name)

    def build_models(self, args, teacher, student):
        self.student, teacher_module = self._method.build_models(args, teacher, student)
        return self.student, teacher_module


def _lora_tensors(out, step):
    folder = out / "ckpts" / f"lora_{step}"
    return load_file(folder / LORA_WEIGHTS), load_file(folder / HEADS_WEIGHTS)


def test_lora_scm_trains_only_adapter_and_head_and_resumes_bit_for_bit(tiny_assets, tmp_path):
    from model.loading import load_flux_transformer

    pipe, data = tiny_assets
    flags = dict(max_train_steps=4, checkpointing_steps=2, **LORA)
    straight_args = scm_args(pipe, data, tmp_path / "straight", **flags)
    kept = _Keep(scm_method(straight_args))
    train(straight_args, kept)

    # Trainable = LoRA A/B + the logvar head; the frozen base equals a fresh load of the pipeline's transformer.
    trainable = {n for n, p in kept.student.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("logvar_linear.") for n in trainable)
    fresh = load_flux_transformer(str(pipe), 1000.0).state_dict()
    base = {n.replace("transformer.", "", 1).replace(".base_layer.", "."): p
            for n, p in kept.student.state_dict().items() if ".lora_" not in n and not n.startswith("logvar_linear")}
    assert base.keys() == fresh.keys() and all(torch.equal(base[k], fresh[k]) for k in fresh)
    # Checkpoints hold only the trainable tensors; exports are LoRA folders, no full transformer .pt.
    saved = load_file(tmp_path / "straight" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert set(saved) == trainable
    assert not list((tmp_path / "straight" / "ckpts").glob("transformer_*.pt"))
    lora, heads = _lora_tensors(tmp_path / "straight", 4)
    assert set(heads) == {"logvar_linear.weight", "logvar_linear.bias"}
    assert all(k.startswith("transformer.") and ".lora_" in k for k in lora)
    first, _ = _lora_tensors(tmp_path / "straight", 2)
    assert any(not torch.equal(first[k], lora[k]) for k in lora)  # the adapter trains

    # Resume from the step-2 checkpoint in a fresh folder: same losses, same adapter and head, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    resumed_args = scm_args(pipe, data, resumed, resume_from_checkpoint="latest", **flags)
    train(resumed_args, scm_method(resumed_args))
    ref, got = read_metrics(tmp_path / "straight"), read_metrics(resumed)
    assert sorted(got) == [3, 4] and all(got[s]["loss_sCM"] == ref[s]["loss_sCM"] for s in got)
    for a, b in zip(_lora_tensors(resumed, 4), (lora, heads)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A changed LoRA flag is refused on resume.
    with pytest.raises(ValueError, match="lora_rank"):
        bad = scm_args(pipe, data, resumed, resume_from_checkpoint="latest", **{**flags, "lora_rank": 8})
        train(bad, scm_method(bad))


def test_lora_meanflow_and_rescale_runs(tiny_assets, tmp_path):
    """MeanFlow: the interval embedder is exported as a head; rescale: fused ×1 weights as usual."""
    from train_meanflow import main as meanflow_main
    from train_rescale import main as rescale_main

    pipe, data = tiny_assets
    common = ["--pretrained_model_name_or_path", str(pipe), "--data_dir", str(data), "--resolution", "32",
              "--train_batch_size", "2", "--max_train_steps", "2", "--checkpointing_steps", "2", "--report_to", "none",
              "--lora_rank", "2"]
    meanflow_main(common + ["--timestep_scale", "1000", "--output_dir", str(tmp_path / "mf")])
    lora, heads = _lora_tensors(tmp_path / "mf", 2)
    assert heads and all(k.startswith("time_text_embed.interval_embedder.") for k in heads)
    info = json.loads((tmp_path / "mf" / "ckpts" / "lora_2" / "lora_info.json").read_text())
    assert info["method"] == "MeanFlow" and info["transformer_config"]["interval_embedding"]

    rescale_main(common + ["--output_dir", str(tmp_path / "rs")])
    export = torch.load(tmp_path / "rs" / "ckpts" / "transformer_2.pt", weights_only=True)
    assert export["config"]["timestep_scale"] == 1.0 and not any(".lora_" in k for k in export["module"])
    assert (tmp_path / "rs" / "rescaled.pt").is_file()


def _streaming_argv(pipe, data, out, **flags):
    return scm_argv(pipe, data, out, data_dir=None, data_files=str(next(data.glob("*.parquet"))), **flags)


def test_streaming_run_resumes_at_the_right_sample(tiny_assets, tmp_path, micro_batches):
    """--streaming: the stream position is (epoch, micro-batch); the first epoch reads the rows in stream order
    (as the map-style dataset numbers them), and a resumed run continues at the right sample, bit for bit."""
    from train_sCM import parse_args

    pipe, data = tiny_assets
    flags = dict(max_train_steps=6, checkpointing_steps=3, streaming=True, max_train_samples=20)
    straight_args = parse_args(_streaming_argv(pipe, data, tmp_path / "straight", **flags))
    train(straight_args, scm_method(straight_args))
    seen = list(micro_batches)
    # 20 rows, batch 4: 5 micro-batches per epoch in stream order, then epoch 1 starts again at row 0.
    assert seen == [list(range(i, i + 4)) for i in range(0, 20, 4)] + [list(range(0, 4))]
    micro_batches.clear()
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    resumed_args = parse_args(_streaming_argv(pipe, data, resumed, resume_from_checkpoint="latest", **flags))
    train(resumed_args, scm_method(resumed_args))
    assert micro_batches == seen[3:]
    ref, got = read_metrics(tmp_path / "straight"), read_metrics(resumed)
    assert sorted(got) == [4, 5, 6] and all(got[s]["loss_sCM"] == ref[s]["loss_sCM"] for s in got)


@pytest.fixture
def micro_batches(monkeypatch):
    """The sample indices of every micro-batch the loop trains on, in order (training.core._micro_step)."""
    import training.core as core

    seen: list[list[int]] = []
    original = core._micro_step

    def micro_step(run, batch, window):
        seen.append(list(batch["indices"]))
        return original(run, batch, window)

    monkeypatch.setattr(core, "_micro_step", micro_step)
    return seen


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_streaming_and_lora_resume_bit_for_bit(tiny_assets, tmp_path):
    """2 processes (DDP, gloo): streamed rows split by rank, LoRA student; checkpoint-3 resumed in a fresh
    folder equals the straight run."""
    pipe, data = tiny_assets
    flags = dict(max_train_steps=5, checkpointing_steps=3, streaming=True, max_train_samples=24, **LORA)

    run = lambda out, **extra: torchrun(_streaming_argv(pipe, data, out, **flags, **extra), nproc=2,
                                        ACCELERATE_USE_CPU="true")
    run(tmp_path / "straight")
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    run(resumed, resume_from_checkpoint="latest")
    ref, got = read_metrics(tmp_path / "straight"), read_metrics(resumed)
    assert sorted(got) == [4, 5] and all(got[s]["loss_sCM"] == ref[s]["loss_sCM"] for s in got)
    for a, b in zip(_lora_tensors(resumed, 5), _lora_tensors(tmp_path / "straight", 5)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(resumed / "checkpoints" / "checkpoint-5" / "custom_checkpoint_0.pkl", weights_only=False)
    # 24 rows, 2 ranks × batch 4: 3 micro-batches per epoch; 5 steps = epoch 1, micro-batch 2; 40 reads.
    assert (state["epoch"], state["batches_in_epoch"], state["samples_seen"]) == (1, 2, 40)


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_lora_resume_is_bitwise_identical(tiny_assets, tmp_path):
    """DeepSpeed ZeRO-2 bf16 (1 process on CPU): the engine saves only the trainable tensors
    (exclude_frozen_parameters) and a resumed LoRA run repeats the straight run's steps exactly."""
    pipe, data = tiny_assets
    flags = dict(ds_file=REPO_ROOT / "parallel_config" / "deepspeed_bf16_batch1.json", max_train_steps=4,
                 checkpointing_steps=2, **LORA)
    run = lambda argv: torchrun(argv, **DEEPSPEED_CPU_ENV)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(scm_argv(pipe, data, straight, **flags))
    module = torch.load(next((straight / "checkpoints" / "checkpoint-2").rglob("mp_rank_00_model_states.pt")),
                        map_location="cpu", weights_only=False)["module"]
    assert module and all(".lora_" in k or k.startswith("logvar_linear.") for k in module)  # no frozen base
    shutil.copytree(straight / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    run(scm_argv(pipe, data, resumed, resume_from_checkpoint="latest", **flags))
    ref, got = read_metrics(straight), read_metrics(resumed)
    assert sorted(got) == [3, 4] and [got[s]["loss_sCM"] for s in got] == [ref[s]["loss_sCM"] for s in got]
    for a, b in zip(_lora_tensors(resumed, 4), _lora_tensors(straight, 4)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_ema_exports_the_averaged_adapter_without_disturbing_training(tiny_assets, tmp_path):
    """--use_ema with LoRA: ckpts/lora_<step>_ema/ holds the EMA of adapter and head (equal to the checkpointed
    average); swapping it in for the export leaves the training itself unchanged, bit for bit."""
    pipe, data = tiny_assets
    flags = dict(max_train_steps=3, checkpointing_steps=1, **LORA)
    plain_args = scm_args(pipe, data, tmp_path / "plain", **flags)
    train(plain_args, scm_method(plain_args))
    ema_args = scm_args(pipe, data, tmp_path / "ema", use_ema=True, ema_decay=0.5, **flags)
    train(ema_args, scm_method(ema_args))
    for a, b in zip(_lora_tensors(tmp_path / "ema", 3), _lora_tensors(tmp_path / "plain", 3)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    shadow = torch.load(tmp_path / "ema" / "checkpoints" / "checkpoint-3" / "hook_states.pt", weights_only=True)["ema"]["shadow"]
    lora, heads = load_file(tmp_path / "ema" / "ckpts" / "lora_3_ema" / LORA_WEIGHTS), \
        load_file(tmp_path / "ema" / "ckpts" / "lora_3_ema" / HEADS_WEIGHTS)
    raw, _ = _lora_tensors(tmp_path / "ema", 3)
    assert any(not torch.equal(lora[k], raw[k]) for k in lora)  # the average, not the raw weights
    for name, value in shadow.items():
        key = name.replace(".student.", ".") if ".lora_" in name else name
        saved = heads[key] if key.startswith("logvar_linear.") else lora[key]
        assert torch.equal(saved, value.to(saved.dtype)), name


def test_lora_bf16_with_gradient_checkpointing_keeps_the_base_in_bf16_and_trains_in_fp32(tiny_assets, tmp_path):
    """--mixed_precision bf16: the frozen base (and so the teacher) is bf16, adapter + head are fp32, the JVP
    and the checkpointed gradient pass run through the mixed-dtype layers."""
    from accelerate.state import AcceleratorState

    pipe, data = tiny_assets
    args = scm_args(pipe, data, tmp_path / "out", max_train_steps=2, checkpointing_steps=2, mixed_precision="bf16",
                    gradient_checkpointing=True, **LORA)
    kept = _Keep(scm_method(args))
    AcceleratorState._reset_state(reset_partial_state=True)  # the process-wide state fixes the precision
    try:
        train(args, kept)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    dtypes = {(p.requires_grad, p.dtype) for p in kept.student.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    metrics = read_metrics(tmp_path / "out")
    assert sorted(metrics) == [1, 2] and all(torch.isfinite(torch.tensor(m["loss_sCM"])) for m in metrics.values())
    lora, _ = _lora_tensors(tmp_path / "out", 2)
    assert all(v.dtype == torch.float32 for v in lora.values())


def _fused_by_hand(pipe, shadow: dict, alpha_over_rank: float) -> dict[str, torch.Tensor]:
    """Independent reference of an EMA LoRA student: the base weights with W + (α/r)·B̄·Ā per adapted layer and the
    averaged heads, from the training state's EMA shadow (not from the export code)."""
    from model.loading import load_flux_transformer

    state = dict(load_flux_transformer(str(pipe), 1000.0).state_dict())
    for name, value in shadow.items():
        name = name.removeprefix("transformer.")
        if ".lora_A." in name:
            layer = name.split(".lora_A.")[0]
            b = shadow[next(k for k in shadow if k.endswith(f"{layer}.lora_B.student.weight"))]
            state[f"{layer}.weight"] = state[f"{layer}.weight"] + alpha_over_rank * b @ value
        elif ".lora_B." not in name:
            state[name] = value  # logvar_linear.* (sCM) or time_text_embed.interval_embedder.* (MeanFlow)
    return state


@pytest.mark.parametrize("method", ["scm", "meanflow"])
def test_lora_ema_export_samples_with_use_ema_like_the_hand_fused_average(tiny_assets, tmp_path, monkeypatch, capsys,
                                                                         method):
    """train --lora_rank --use_ema → test_sCM.py/test_meanflow.py --resume_path ckpts/lora_<step> --use_ema: the
    images are those of the base with the EMA adapter and heads fused by hand (a full .pt export), not the raw ones."""
    from model.sampling_cli import cli, main
    from train_meanflow import main as meanflow_main
    from train_sCM import main as scm_main

    pipe, data = tiny_assets
    out = tmp_path / "run"
    (scm_main if method == "scm" else meanflow_main)(
        ["--pretrained_model_name_or_path", str(pipe), "--timestep_scale", "1000", "--data_dir", str(data),
         "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2", "--checkpointing_steps", "2",
         "--report_to", "none", "--learning_rate", "5e-2", "--lora_rank", "2", "--lora_alpha", "4", "--use_ema",
         "--ema_decay", "0.5", "--output_dir", str(out)])
    shadow = torch.load(out / "checkpoints" / "checkpoint-2" / "hook_states.pt", weights_only=True)["ema"]["shadow"]
    info = json.loads((out / "ckpts" / "lora_2_ema" / "lora_info.json").read_text())
    reference = tmp_path / "fused_ema.pt"
    torch.save({"module": _fused_by_hand(pipe, shadow, 4 / 2), "config": info["transformer_config"]}, reference)

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def sample(name, resume, *flags):
        main(method, ["--pretrained_model_name_or_path", str(pipe), "--resume_path", str(resume), *flags,
                      "--output_dir", str(tmp_path / name), "--prompt", "a red square", "--n_samples", "1",
                      "--resolution", "32", "--num_inference_steps", "2", "--no_progress"])
        return np.asarray(Image.open(tmp_path / name / "00000" / "samples" / "0000.png").convert("RGB")).astype(int)

    ema = sample("ema", f"{out}/ckpts/lora_2/", "--use_ema")  # a trailing slash is the same folder
    assert np.abs(ema - sample("by_hand", reference)).max() <= 1  # fused vs adapter: float rounding only
    raw_gap = np.abs(ema - sample("raw", out / "ckpts" / "lora_2")).max()
    assert raw_gap > 4  # the average, not the raw weights (4× the rounding tolerance above)

    # A LoRA export without an EMA sibling is refused in one line that says what to do; nothing is written.
    shutil.copytree(out / "ckpts" / "lora_2", tmp_path / "other" / "ckpts" / "lora_2")
    capsys.readouterr()
    assert cli(method, ["--pretrained_model_name_or_path", str(pipe), "--resume_path",
                        str(tmp_path / "other" / "ckpts" / "lora_2"), "--use_ema", "--output_dir",
                        str(tmp_path / "refused"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "there is no lora_2_ema/ beside" in err and "without --use_ema" in err
    assert not (tmp_path / "refused").exists()
