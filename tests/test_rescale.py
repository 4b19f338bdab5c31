"""Teacher rescaling (training/rescale.py, train_rescale.py, check_rescale.py) on the tiny FLUX pipeline (CPU)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel

from conftest import REPO_ROOT
from model_factory import TINY, tiny_inputs, tiny_transformer

SCRIPT = REPO_ROOT / "script" / "rescale_teacher.sh"
STEPS, EVERY, LR = 30, 15, 1e-4


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "offline", "NUM_WORKERS": "0", "MASTER_PORT": str(29500 + (os.getpid() + 7) % 1000)}
    env.pop("DS_FILE", None)
    env.update(extra)
    return env


def _in_process(main, argv: list[str]):
    """Run an entry point's ``main`` in this process (the core installs SIGTERM/SIGINT handlers: restore them)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return main(argv)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _rescale_argv(pipe: Path, data: Path, out: Path, steps: int, every: int) -> list[str]:
    return ["--pretrained_model_name_or_path", str(pipe), "--data_dir", str(data), "--resolution", "64",
            "--train_batch_size", "2", "--learning_rate", str(LR), "--max_train_steps", str(steps),
            "--checkpointing_steps", str(every), "--output_dir", str(out), "--report_to", "none", "--seed", "0"]


@pytest.fixture(scope="module")
def rescale_run(tiny_assets, tmp_path_factory) -> Path:
    """30 self-distillation steps at lr 1e-4 (exports at steps 15 and 30), in process to keep the file fast."""
    import train_rescale

    pipe, data = tiny_assets
    out = tmp_path_factory.mktemp("rescale") / "run"
    _in_process(train_rescale.main, _rescale_argv(pipe, data, out, STEPS, EVERY))
    return out


def _stock_state(pipe: Path) -> dict:
    from model.loading import load_flux_transformer

    return load_flux_transformer(str(pipe), 1000.0).state_dict()


# ------------------------------------------------------------------------------------------- outputs

def test_run_writes_pt_and_diffusers_folder_with_unit_scale(rescale_run, tiny_assets):
    from model.loading import read_checkpoint
    from model.transformer import DistillFluxTransformer2DModel

    out = rescale_run
    metrics = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(math.isfinite(m["loss_smooth_l1"]) for m in metrics)

    pt = torch.load(out / "rescaled.pt", map_location="cpu", weights_only=True)
    assert set(pt) == {"module", "config", "step"} and pt["step"] == STEPS
    assert pt["config"]["timestep_scale"] == 1.0 and pt["config"]["interval_embedding"] is False
    # rescaled.pt is a byte copy of the core's final export.
    assert (out / "rescaled.pt").read_bytes() == (out / "ckpts" / f"transformer_{STEPS}.pt").read_bytes()

    folder = out / "rescaled_transformer"
    assert json.loads((folder / "config.json").read_text())["timestep_scale"] == 1.0
    assert list(folder.glob("diffusion_pytorch_model*.safetensors"))
    from_folder = read_checkpoint(folder).state_dict
    assert set(from_folder) == set(pt["module"])
    assert all(torch.equal(from_folder[k], v) for k, v in pt["module"].items())
    # diffusers' own loader gives the x1 model.
    assert DistillFluxTransformer2DModel.from_pretrained(folder).timestep_scale == 1.0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"

    # It was trained: the time/guidance embedders moved away from the stock weights.
    stock = _stock_state(tiny_assets[0])
    for key in ("time_text_embed.timestep_embedder.linear_1.weight", "time_text_embed.guidance_embedder.linear_1.weight"):
        assert not torch.equal(pt["module"][key], stock[key])


def test_velocity_gap_strictly_decreases_during_self_distillation(rescale_run, tiny_assets, tmp_path):
    """check_rescale's velocity MSE to the original: step 0 (stock weights, x1 inputs) > step 15 > step 30."""
    import check_rescale

    pipe, data = tiny_assets
    gaps, baselines = [], []
    for step in (EVERY, STEPS):
        report = check_rescale.main(
            ["--pretrained_model_name_or_path", str(pipe), "--rescaled_checkpoint_path",
             str(rescale_run / "ckpts" / f"transformer_{step}.pt"), "--data_dir", str(data), "--resolution", "64",
             "--num_pairs", "64", "--baseline", "--seeds", "--json", str(tmp_path / f"check{step}.json")])
        gaps.append(report["models"]["rescaled"]["velocity"]["mse"])
        baselines.append(report["models"]["baseline"]["velocity"]["mse"])
        assert json.loads((tmp_path / f"check{step}.json").read_text())["models"]["rescaled"]["velocity"]["mse"] == gaps[-1]
    assert baselines[0] == baselines[1]  # the pairs are fixed by the seed
    step0, step15, step30 = baselines[0], *gaps
    assert step0 > step15 > step30, (step0, step15, step30)
    assert step30 < 0.8 * step0, (step0, step30)


# ------------------------------------------------------------------------------------------- trainers

def _scm_argv(pipe: Path, data: Path, out: Path, rescaled: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(pipe), "--rescaled_checkpoint_path", str(rescaled), "--data_dir",
            str(data), "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "1",
            "--checkpointing_steps", "1", "--learning_rate", "1e-6", "--output_dir", str(out), "--report_to", "none"]


@pytest.mark.parametrize("name", ["rescaled.pt", "rescaled_transformer"])
def test_train_sCM_starts_from_the_rescaled_teacher(name, rescale_run, tiny_assets, tmp_path):
    import train_sCM

    pipe, data = tiny_assets
    _in_process(train_sCM.main, _scm_argv(pipe, data, tmp_path / "scm", rescale_run / name))
    export = torch.load(tmp_path / "scm" / "ckpts" / "transformer_1.pt", map_location="cpu", weights_only=True)
    assert export["config"]["timestep_scale"] == 1.0
    # One Adam step at lr 1e-6 moves each weight by about 1e-6: the student started from the rescaled weights,
    # which differ from the stock ones by far more.
    rescaled = torch.load(rescale_run / "rescaled.pt", map_location="cpu", weights_only=True)["module"]
    stock = _stock_state(pipe)
    key = "time_text_embed.timestep_embedder.linear_1.weight"
    assert (export["module"][key] - rescaled[key]).abs().max() < 3e-6
    assert (rescaled[key] - stock[key]).abs().max() > 1e-4


def test_train_sCM_refuses_a_x1000_checkpoint(tiny_assets, tmp_path):
    """The stock transformer folder (config without timestep_scale, i.e. x1000) with the default --timestep_scale 1."""
    pipe, data = tiny_assets
    out = tmp_path / "scm"
    proc = subprocess.run([sys.executable, "train_sCM.py", *_scm_argv(pipe, data, out, pipe / "transformer")],
                          cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "timestep_scale" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_refusal_of_a_x1000_export_names_the_fix(tiny_assets, tmp_path, capsys):
    """Same through the .pt format (config says 1000), in process; check_rescale refuses it too."""
    import check_rescale
    import train_sCM
    from training.cli import run_cli

    pipe, data = tiny_assets
    from model.loading import load_flux_transformer

    stock = load_flux_transformer(str(pipe), 1000.0)
    bad = tmp_path / "x1000.pt"
    torch.save({"module": stock.state_dict(), "config": dict(stock.config)}, bad)
    out = tmp_path / "scm"
    argv = _scm_argv(pipe, data, out, bad)
    assert _in_process(lambda a: run_cli(lambda: train_sCM.main(a)), argv) == 2
    err = capsys.readouterr().err
    assert "timestep_scale=1000" in err and "rescale_teacher.sh" in err
    assert not out.exists()
    assert run_cli(lambda: check_rescale.main(["--pretrained_model_name_or_path", str(pipe), "--rescaled_checkpoint_path",
                                               str(bad), "--resolution", "64", "--seeds"])) == 2
    assert "timestep_scale=1000" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("flags, message", [
    (["--rescaled_checkpoint_path", "x.pt"], "--rescaled_checkpoint_path is not accepted"),
    (["--timestep_scale", "1"], "--timestep_scale is not accepted"),
    (["--guidance_min", "5", "--guidance_max", "1"], "--guidance_min"),
    (["--objective", "distill"], "invalid choice"),
    (["--smooth_l1_beta", "0"], "--smooth_l1_beta"),
])
def test_train_rescale_bad_flags(flags, message, tiny_assets, tmp_path, capsys):
    import train_rescale

    pipe, data = tiny_assets
    with pytest.raises(SystemExit) as exc:
        train_rescale.parse_args(["--pretrained_model_name_or_path", str(pipe), "--data_dir", str(data),
                                  "--output_dir", str(tmp_path / "out"), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_rescale_defaults_follow_the_paper(tiny_assets, tmp_path):
    import train_rescale

    pipe, data = tiny_assets
    args = train_rescale.parse_args(["--pretrained_model_name_or_path", str(pipe), "--data_dir", str(data),
                                     "--output_dir", str(tmp_path / "out")])
    assert (args.objective, args.loss, args.timestep_scale, args.rescaled_checkpoint_path) == \
        ("self_distill", "smooth_l1", 1000.0, None)


# ------------------------------------------------------------------------------------------- method and loss

def _stock_copy(model) -> FluxTransformer2DModel:
    stock = FluxTransformer2DModel(**TINY).eval()
    stock.load_state_dict(model.state_dict())
    return stock


def _call(model, x, t, inputs, guidance=None):
    return model(x, timestep=t, **{**inputs.kwargs(torch.float32),
                                   **({} if guidance is None else {"guidance": guidance})})[0]


def test_build_models_switches_only_the_student_to_unit_scale(tiny_assets):
    from model.loading import load_flux_transformer
    from training.rescale import RescaleLoss, RescaleLossConfig, RescaleMethod

    pipe, _ = tiny_assets
    teacher, student = (load_flux_transformer(str(pipe), 1000.0) for _ in range(2))
    fresh_x1 = load_flux_transformer(str(pipe), 1.0)  # stock weights loaded directly with x1 inputs
    method = RescaleMethod(RescaleLoss(RescaleLossConfig()))
    s, t = method.build_models(None, teacher, student)
    assert s is student and t is teacher
    assert (student.timestep_scale, student.time_text_embed.timestep_scale, teacher.timestep_scale) == (1.0, 1.0, 1000.0)
    c = student.config
    side = 4
    x = torch.randn(2, side * side, c.in_channels)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)),
                                     indexing="ij"), -1)
    from model.trigflow import FluxInputs

    inputs = FluxInputs(torch.randn(2, 5, c.joint_attention_dim), torch.randn(2, c.pooled_projection_dim),
                        torch.zeros(5, 3), ids.reshape(-1, 3).float(), torch.tensor([3.5, 4.0]))
    time = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert torch.equal(_call(student, x, time, inputs), _call(fresh_x1, x, time, inputs))
        assert not torch.allclose(_call(student, x, time, inputs), _call(teacher, x, time, inputs))
    state, config = method.export_state_dict(student)
    assert config["timestep_scale"] == 1.0 and state.keys() == student.state_dict().keys()

    fm = RescaleMethod(RescaleLoss(RescaleLossConfig(objective="flow_matching")))
    _, dropped = fm.build_models(None, *(load_flux_transformer(str(pipe), 1000.0) for _ in range(2)))
    assert isinstance(dropped, torch.nn.Identity)  # flow matching never calls the teacher


def _smooth_l1_by_hand(d: torch.Tensor, beta: float) -> torch.Tensor:
    a = d.abs()
    return torch.where(a < beta, 0.5 * d * d / beta, a - 0.5 * beta)


@pytest.mark.parametrize("objective, loss, beta", [("self_distill", "smooth_l1", 0.02), ("self_distill", "mse", 1.0),
                                                   ("flow_matching", "smooth_l1", 0.02), ("flow_matching", "mse", 1.0)])
def test_loss_against_stock_diffusers_reference(objective, loss, beta):
    """Teacher = stock diffusers FLUX at (1000t, 1000g); student at step 0 = stock FLUX fed (t/1000·1000, g)."""
    from training.rescale import RescaleLoss, RescaleLossConfig

    teacher = tiny_transformer()
    student = tiny_transformer(timestep_scale=1.0)  # same seed: same weights
    x0, inputs = tiny_inputs(guidance=None)
    g = torch.tensor([3.5, 5.0])
    inputs.guidance = g.clone()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.25, 0.9])
    out = RescaleLoss(RescaleLossConfig(objective=objective, loss=loss, smooth_l1_beta=beta))(
        student, teacher, x0, inputs, has_guidance=True, noise=noise, t=t)

    z = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
    with torch.no_grad():
        stock = _stock_copy(student)
        # diffusers multiplies timestep and guidance by 1000 itself; dividing first gives the x1 student.
        v_student = _call(stock, z, t / 1000, inputs, guidance=g / 1000)
        target = _call(stock, z, t, inputs, guidance=g) if objective == "self_distill" else noise - x0
    d = v_student - target
    ref = (d.square() if loss == "mse" else _smooth_l1_by_hand(d, beta)).mean()
    assert torch.allclose(out.loss, ref, rtol=1e-4, atol=1e-7), (out.loss, ref)
    if loss == "smooth_l1":  # the small beta exercises both branches
        assert (d.abs() < beta).any() and (d.abs() >= beta).any()
    out.loss.backward()
    assert student.time_text_embed.timestep_embedder.linear_1.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_flux_shift_time_sampling_matches_diffusers():
    """t = sigmoid(m + μ(N) + s·n) equals diffusers' time_shift(μ, 1, logit-normal t) with μ = calculate_shift(N)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from training.rescale import RescaleLoss, RescaleLossConfig, ShiftSchedule

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    shift = ShiftSchedule.from_scheduler_config(sched.config)
    for n in (16, 1024, 4096):
        assert shift.mu(n) == pytest.approx(calculate_shift(n, 256, 4096, 0.5, 1.15), rel=1e-12)
    loss = RescaleLoss(RescaleLossConfig(time_sampling="flux_shift", logit_mean=0.3, logit_std=1.2, shift=shift))
    plain = RescaleLoss(RescaleLossConfig(time_sampling="logit_normal", logit_mean=0.3, logit_std=1.2))
    torch.manual_seed(0)
    ours = loss.sample_time(1000, 1024, "cpu")
    torch.manual_seed(0)
    reference = sched.time_shift(calculate_shift(1024, 256, 4096, 0.5, 1.15), 1.0, plain.sample_time(1000, 1024, "cpu"))
    assert torch.allclose(ours, reference, atol=1e-6)
    assert 0 < ours.min() and ours.max() < 1 and ours.mean() > 0.6  # shifted towards noise (μ ≈ 0.63)


def test_velocity_gap_against_a_hand_computation():
    from model.trigflow import FluxInputs, flow_velocity
    from training.rescale import VelocityPairs, velocity_gap

    original, rescaled = tiny_transformer(), tiny_transformer(timestep_scale=1.0)
    x0, inputs = tiny_inputs(batch=6)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.05, 0.2, 0.3, 0.55, 0.8, 0.95])
    pairs = VelocityPairs.from_latents(x0, noise, t, inputs)
    report = velocity_gap(original, rescaled, pairs, batch_size=4, t_bins=4)
    with torch.no_grad():
        z = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
        v_o, v_r = _call(_stock_copy(original), z, t, inputs), flow_velocity(rescaled, z, t, inputs)
    err = (v_r - v_o).square()
    assert report["mse"] == pytest.approx(err.mean().item(), rel=1e-5)
    assert report["rel_mse"] == pytest.approx((err.sum() / v_o.square().sum()).item(), rel=1e-5)
    assert [b["count"] for b in report["mse_by_t"]] == [2, 1, 1, 2]
    assert report["mse_by_t"][1]["mse"] == pytest.approx(err[2].mean().item(), rel=1e-5)
    same = velocity_gap(original, original, pairs)
    assert same["mse"] == 0.0 and same["rel_mse"] == 0.0


def test_check_samples_use_the_swapped_transformer(rescale_run, tiny_assets, tmp_path):
    """check_rescale's sample gap equals one computed with FluxPipeline.from_pretrained(transformer=...) directly."""
    import check_rescale
    from diffusers import FluxPipeline

    from model.loading import load_flux_transformer, load_transformer_weights

    pipe, _ = tiny_assets
    report = check_rescale.main(["--pretrained_model_name_or_path", str(pipe), "--rescaled_checkpoint_path",
                                 str(rescale_run / "rescaled_transformer"), "--resolution", "64", "--num_pairs", "8",
                                 "--num_inference_steps", "4", "--seeds", "7", "--prompts", "a red circle",
                                 "--save_images", str(tmp_path / "img")])
    assert report["pairs"]["source"].startswith("random_latents")
    images = {}
    for name, scale in (("original", 1000.0), ("rescaled", 1.0)):
        model = load_flux_transformer(str(pipe), scale)
        if name == "rescaled":
            load_transformer_weights(model, str(rescale_run / "rescaled.pt"))
        p = FluxPipeline.from_pretrained(str(pipe), transformer=model)
        images[name] = p("a red circle", height=64, width=64, num_inference_steps=4, guidance_scale=3.5,
                         generator=torch.Generator().manual_seed(7), output_type="pt",
                         max_sequence_length=256).images[0]
    expected = (images["rescaled"] - images["original"]).square().mean().item()
    got = report["models"]["rescaled"]["samples"][0]["image_mse"]
    assert expected > 0 and got == pytest.approx(expected, rel=1e-4, abs=1e-12)
    assert (tmp_path / "img" / "seed0007_original_vs_rescaled.png").exists()


@pytest.mark.slow
def test_script_rescale_teacher_runs_through_the_launcher(tiny_assets, tmp_path):
    """script/rescale_teacher.sh (torchrun launcher, paper defaults) for 2 steps writes both outputs."""
    pipe, data = tiny_assets
    out = tmp_path / "run"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "1e-4", "64", "2", str(out), "--data_dir", str(data), "--max_train_steps", "2",
         "--checkpointing_steps", "2", "--report_to", "none"],
        cwd=REPO_ROOT, env=_env(MODEL_NAME=str(pipe)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    config = json.loads((out / "checkpoints" / "checkpoint-2" / "run_config.json").read_text())
    assert (config["objective"], config["loss"], config["method"]) == ("self_distill", "smooth_l1", "rescale")
    assert torch.load(out / "rescaled.pt", weights_only=True)["config"]["timestep_scale"] == 1.0
    assert json.loads((out / "rescaled_transformer" / "config.json").read_text())["timestep_scale"] == 1.0
