"""End-to-end MeanFlow training through script/train_meanflow.sh on the tiny FLUX pipeline (CPU)."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "script" / "train_meanflow.sh"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "offline", "NUM_WORKERS": "0", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    for name in ("DS_FILE", "ACCELERATE_USE_CPU"):  # the launcher decides these
        env.pop(name, None)
    env.update(extra)
    return env


def _run_script(positional: list[str], extra: list[str], timeout: int = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *positional, *extra], cwd=REPO_ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _tiny_args(pipe: Path, data: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(pipe), "--timestep_scale", "1000", "--data_dir", str(data),
            "--resolution", "64", "--max_train_steps", "2", "--checkpointing_steps", "2", "--report_to", "none"]


@pytest.fixture(scope="module")
def teacher_file(tiny_assets, tmp_path_factory) -> Path:
    """The tiny teacher as a 'rescaled checkpoint' in the original .pt format (+ our config)."""
    from model.loading import load_flux_transformer

    pipe, _ = tiny_assets
    teacher = load_flux_transformer(str(pipe), 1000.0)
    path = tmp_path_factory.mktemp("teacher") / "rescaled.pt"
    torch.save({"module": teacher.state_dict(), "config": dict(teacher.config)}, path)
    return path


def _check_run(out: Path, pipe: Path, teacher_file: Path, steps: int = 2) -> list[dict]:
    from model.loading import load_flux_transformer, load_transformer_weights

    metrics = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["loss_mean_ref"]) for m in metrics)
    assert (out / "checkpoints" / f"checkpoint-{steps}" / "run_config.json").exists()

    export = torch.load(out / "ckpts" / f"transformer_{steps}.pt", map_location="cpu", weights_only=True)
    assert set(export) == {"module", "config", "step"} and export["step"] == steps
    assert export["config"]["interval_embedding"] is True
    assert any(k.startswith("time_text_embed.interval_embedder.") for k in export["module"])
    student = load_flux_transformer(str(pipe), 1000.0)
    load_transformer_weights(student, str(out / "ckpts" / f"transformer_{steps}.pt"), require_interval=True)
    loaded = student.state_dict()
    assert all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in export["module"].items())

    teacher = torch.load(teacher_file, map_location="cpu", weights_only=True)["module"]
    same_dtype = lambda k, v: v.to(export["module"][k].dtype)  # bf16 under DeepSpeed: compare at its precision
    changed = [k for k, v in teacher.items() if not torch.equal(export["module"][k], same_dtype(k, v))]
    assert len(changed) > len(teacher) // 2, f"only {len(changed)} of {len(teacher)} tensors changed"
    # copy-init: the interval embedder started as the timestep embedder and was trained from there.
    key = "time_text_embed.interval_embedder.linear_1.weight"
    assert not torch.equal(export["module"][key], same_dtype(key, teacher["time_text_embed.timestep_embedder.linear_1.weight"]))
    return metrics


def test_script_trains_two_steps_with_cfg_meanflow(tiny_assets, teacher_file, tmp_path):
    pipe, data = tiny_assets
    out = tmp_path / "run"
    pipe_weights = sorted((pipe / "transformer").glob("*.safetensors"))
    before = {p: _sha256(p) for p in [teacher_file, *pipe_weights]}
    proc = _run_script(["1e-4", "64", "2", "True", "1", "0.5", "0.0", "1.0", str(out), str(teacher_file)],
                       _tiny_args(pipe, data))
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The README recipe (omega 1, kappa 0.5) is legal; the effective guidance scale is reported.
    assert "omega/(1-kappa) = 2" in proc.stderr
    metrics = _check_run(out, pipe, teacher_file)
    assert all(m["frac_cfg"] + m["frac_dropped"] <= 1 for m in metrics)
    assert {p: _sha256(p) for p in before} == before, "the teacher files were modified"
    print("MeanFlow tiny run:", [(m["step"], round(m["loss"], 6), round(m["loss_mean_ref"], 3)) for m in metrics])


def test_bad_flags_through_the_script_exit_nonzero_without_output(tiny_assets, tmp_path):
    pipe, data = tiny_assets
    out = tmp_path / "never"
    proc = _run_script(["1e-4", "64", "2", "True", "1", "0.5", "0.9", "0.2", str(out), "none"],
                       _tiny_args(pipe, data), timeout=120)
    assert proc.returncode != 0
    assert "--cfg_min_t 0.9 > --cfg_max_t 0.2" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--cfg_kappa", "1.0"], "--cfg_kappa 1 must be in [0, 1)"),
    (["--cfg_kappa", "-0.1"], "--cfg_kappa -0.1 must be in [0, 1)"),
    (["--cfg_omega", "0"], "--cfg_omega 0 must be > 0"),
    (["--cfg_min_t", "0.8", "--cfg_max_t", "0.3"], "--cfg_min_t 0.8 > --cfg_max_t 0.3"),
    (["--ratio_r_not_equal_t", "1.2"], "--ratio_r_not_equal_t 1.2 must be in [0, 1]"),
    (["--cfg_prob", "1.5"], "--cfg_prob 1.5 must be in [0, 1]"),
    (["--time_sigma", "0"], "--time_sigma 0 must be > 0"),
])
def test_bad_flags_give_one_line_errors(flags, message, tiny_assets, tmp_path, capsys):
    import train_meanflow
    from training.cli import run_cli

    pipe, data = tiny_assets
    out = tmp_path / "never"
    argv = [*_tiny_args(pipe, data), "--output_dir", str(out), *flags]
    assert run_cli(lambda: train_meanflow.main(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out.exists()


def test_flag_parsing_matches_the_original_forms(tiny_assets, tmp_path):
    import train_meanflow

    pipe, data = tiny_assets
    base = [*_tiny_args(pipe, data), "--output_dir", str(tmp_path / "o")]
    args = train_meanflow.parse_args(base)
    assert (args.use_cfg_meanflow, args.cfg_scale, args.dual_time_init, args.jvp_velocity,
            args.cfg_velocity_interval, args.cfg_prob) == (False, (4.0, 4.5, 5.0), "copy", "data", "interval", 0.1)
    args = train_meanflow.parse_args([*base, "--use_cfg_meanflow=True", "--cfg_scale", "3", "3.5"])
    assert args.use_cfg_meanflow is True and args.cfg_scale == (3.0, 3.5)
    assert train_meanflow.parse_args([*base, "--use_cfg_meanflow", "--cfg_scale", "2,6"]).cfg_scale == (2.0, 6.0)
    with pytest.raises(SystemExit):
        train_meanflow.parse_args([*base, "--jvp_velocity", "both"])


def test_unconditional_embedding_is_diffusers_encoding_of_a_space(tiny_assets):
    from diffusers import FluxPipeline

    from model.flux_io import FluxConditioner, load_flux_components
    from training.meanflow import MeanFlowLoss, MeanFlowLossConfig, MeanFlowMethod

    pipe, _ = tiny_assets
    method = MeanFlowMethod(MeanFlowLoss(MeanFlowLossConfig()), None)
    method.setup(FluxConditioner(load_flux_components(str(pipe)), "cpu", max_sequence_length=32))
    reference = FluxPipeline.from_pretrained(str(pipe), transformer=None)
    with torch.no_grad():
        embeds, pooled, _ = reference.encode_prompt([" "], prompt_2=None, max_sequence_length=32)
        other, _, _ = reference.encode_prompt(["a red circle"], prompt_2=None, max_sequence_length=32)
    assert method.uncond.encoder_hidden_states.shape == (1, 32, embeds.shape[-1])
    torch.testing.assert_close(method.uncond.encoder_hidden_states, embeds.float())
    torch.testing.assert_close(method.uncond.pooled_projections, pooled.float())
    assert not torch.allclose(embeds, other)


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_zero2_bf16_through_torchrun(tiny_assets, teacher_file, tmp_path):
    """ZeRO-2 bf16 on CPU (torchrun via the script); the first run JIT-compiles DeepSpeed's shm comm op.

    DS_ACCELERATOR=cpu only: ACCELERATE_USE_CPU=true would make accelerate drop the DeepSpeed plugin
    (the core refuses that), so the launcher leaves it unset when --ds_file is given."""
    pipe, data = tiny_assets
    out = tmp_path / "ds"
    cache = REPO_ROOT / ".cache" / "torch_extensions"
    proc = _run_script(["1e-4", "64", "1", "True", "1", "0.5", "0.0", "1.0", str(out), str(teacher_file)],
                       _tiny_args(pipe, data), timeout=600, DS_ACCELERATOR="cpu",
                       DS_FILE=str(REPO_ROOT / "parallel_config" / "deepspeed_bf16_batch1.json"),
                       TORCH_EXTENSIONS_DIR=str(cache))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "distributed type DEEPSPEED" in proc.stderr
    _check_run(out, pipe, teacher_file)
    export = torch.load(out / "ckpts" / "transformer_2.pt", map_location="cpu", weights_only=True)
    assert {v.dtype for v in export["module"].values()} == {torch.bfloat16}  # DeepSpeed's bf16 module
