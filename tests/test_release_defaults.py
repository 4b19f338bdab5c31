"""Every default reproduces the original release (upstream-spec.md); each deviation is an explicit option.

Closed-form / independent checks on the tiny FLUX:
* sCM logvar head: Linear(time_text_embed(t, g, pooled)) at the TrigFlow angle t with the ×1 sinusoid,
  computed with diffusers' *stock* embedding module, and gradients reaching time_text_embed;
* MeanFlow CFG target: u_c, u_∅ evaluated at the interval h = t − r;
* the launch scripts' effective gradient clip (1.0, also written into the DeepSpeed config);
* the trainers' and samplers' flag defaults, and one-line errors for bad option values.
"""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from model.trigflow import FluxInputs, TrigFlowFlux, trig_to_flow_time
from model_factory import stock_time_text_embed, tiny_inputs, tiny_transformer
from training.meanflow import MeanFlowLoss, MeanFlowLossConfig, UncondEmbedding
from training.scm import SCMMethod

REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64


def _scm_student(logvar_input: str, timestep_scale: float = 1.0) -> TrigFlowFlux:
    student = TrigFlowFlux(tiny_transformer(seed=0, timestep_scale=timestep_scale, dtype=F64), with_logvar=True,
                           logvar_input=logvar_input).double()
    with torch.no_grad():
        student.logvar_linear.bias.fill_(0.3)
    return student


def _head(student: TrigFlowFlux, cond: torch.Tensor) -> torch.Tensor:
    return (cond @ student.logvar_linear.weight.T + student.logvar_linear.bias).reshape(-1).float()  # as returned


# --------------------------------------------------------------------------------------- sCM logvar head
@pytest.mark.parametrize("timestep_scale", [1.0, 1000.0])
def test_default_logvar_is_linear_of_stock_time_text_embed_at_trigflow_angle_x1(timestep_scale):
    student = _scm_student("trig_time", timestep_scale)
    latents, inputs = tiny_inputs(batch=3, dtype=F64)
    inputs.guidance = torch.tensor([4.0, 4.5, 5.0], dtype=F64)
    t = torch.tensor([0.3, 0.9, 1.45], dtype=F64)
    _, logvar = student(latents, t, inputs, return_logvar=True)
    # The release: self.time_text_embed(t, guidance, pooled) on its ×1 model = the stock module fed t and g
    # unscaled, whatever factor the transformer's own forward applies.
    expected = _head(student, stock_time_text_embed(student.transformer)(t, inputs.guidance, inputs.pooled_projections))
    torch.testing.assert_close(logvar, expected, rtol=1e-6, atol=1e-6)
    # Not the conditioning at the flow time s (the other option): the two differ by far more than rounding.
    at_s = _head(student, stock_time_text_embed(student.transformer)(
        timestep_scale * trig_to_flow_time(t), timestep_scale * inputs.guidance, inputs.pooled_projections))
    assert (logvar - at_s).abs().max() > 1e-3


def test_flow_time_option_reads_flux_conditioning_at_flow_time():
    scale = 1000.0
    student = _scm_student("flow_time", scale)
    latents, inputs = tiny_inputs(batch=2, dtype=F64)
    t = torch.tensor([0.5, 1.2], dtype=F64)
    _, logvar = student(latents, t, inputs, return_logvar=True)
    s = trig_to_flow_time(t)
    expected = _head(student, stock_time_text_embed(student.transformer)(scale * s, scale * inputs.guidance,
                                                                         inputs.pooled_projections))
    torch.testing.assert_close(logvar, expected, rtol=1e-6, atol=1e-6)


def test_default_logvar_gradient_reaches_time_text_embed_as_the_release():
    student = _scm_student("trig_time")
    latents, inputs = tiny_inputs(batch=2, dtype=F64)
    t = torch.tensor([0.4, 1.3], dtype=F64)
    _, logvar = student(latents, t, inputs, return_logvar=True)
    logvar.sum().backward()
    embed = student.transformer.time_text_embed
    # Closed form: logvar_i = W·(… + text_embedder(pooled_i)) + b, so d Σ logvar / d(text bias) = B·W.
    torch.testing.assert_close(embed.text_embedder.linear_2.bias.grad, 2 * student.logvar_linear.weight[0].detach())
    ours = {n: p.grad.clone() for n, p in embed.named_parameters()}
    assert all(g.abs().sum() > 0 for g in ours.values())
    # The same gradients as autograd through diffusers' stock embedding at t (shared tensors, grads reset).
    student.zero_grad(set_to_none=True)
    ref = _head(student, stock_time_text_embed(student.transformer)(t, inputs.guidance, inputs.pooled_projections))
    ref.sum().backward()
    for name, param in embed.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-5, atol=1e-6, msg=name)  # float32 stock sinusoid


def test_bad_logvar_input_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--logvar_input 'flow' is not one of trig_time, flow_time"):
        TrigFlowFlux(tiny_transformer(), with_logvar=True, logvar_input="flow")
    with pytest.raises(SystemExit) as exc:
        _parse("train_sCM", ["--logvar_input", "flow"], tmp_path)
    assert exc.value.code == 2
    assert "argument --logvar_input: invalid choice: 'flow'" in capsys.readouterr().err.strip().splitlines()[-1]


# --------------------------------------------------------------------------------- MeanFlow CFG interval
class _LinearStudent(torch.nn.Module):
    """u(z, r, t | c) = z·(1 + t) + (t − r)·(2 + c), c = mean T5 embedding: u depends on h = t − r."""

    def forward(self, z, r, t, inputs: FluxInputs):
        c = inputs.encoder_hidden_states.mean(dim=(-2, -1)).reshape(-1, 1, 1)
        t, r = t.reshape(-1, 1, 1), r.reshape(-1, 1, 1)
        return z * (1 + t) + (t - r) * (2 + c)


class _Teacher(torch.nn.Module):
    def forward(self, z, t, inputs: FluxInputs):
        return torch.cos(z) + t.reshape(-1, 1, 1)


def test_default_cfg_target_uses_student_velocity_at_interval_t_minus_r():
    omega, kappa = 1.0, 0.5
    config = MeanFlowLossConfig(use_cfg_meanflow=True, cfg_omega=omega, cfg_kappa=kappa)  # the rest: defaults
    assert config.cfg_velocity_interval == "interval"
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 2, generator=g, dtype=F64), torch.randn(2, 3, 2, generator=g, dtype=F64)
    inputs = FluxInputs(torch.randn(2, 4, 5, generator=g, dtype=F64), torch.randn(2, 6, generator=g, dtype=F64),
                        torch.zeros(4, 3), torch.zeros(3, 3), torch.tensor([4.0, 5.0], dtype=F64))
    uncond = UncondEmbedding(torch.randn(1, 4, 5, generator=g, dtype=F64), torch.randn(1, 6, generator=g, dtype=F64))
    t, r = torch.tensor([0.8, 0.6], dtype=F64), torch.tensor([0.3, 0.1], dtype=F64)
    out = MeanFlowLoss(config)(_LinearStudent(), _LinearStudent(), _Teacher(), x0, inputs, uncond, noise=noise,
                               t=t, r=r, drop=torch.tensor([False, False]))
    # By hand: ṽ = ω·v_T + κ·u_c + (1 − ω − κ)·u_∅ with u at h = t − r; du/dt along (ṽ, 0, 1) = (1 + t)·ṽ + z + 2 + c;
    # u_tgt = ṽ − (t − r)·du/dt.
    tb, hb = t.reshape(-1, 1, 1), (t - r).reshape(-1, 1, 1)
    z = (1 - tb) * x0 + tb * noise
    c = inputs.encoder_hidden_states.mean(dim=(-2, -1)).reshape(-1, 1, 1)
    c_u = uncond.encoder_hidden_states.mean()
    u_c, u_u = z * (1 + tb) + hb * (2 + c), z * (1 + tb) + hb * (2 + c_u)
    guided = omega * (torch.cos(z) + tb) + kappa * u_c + (1 - omega - kappa) * u_u
    target = guided - hb * ((1 + tb) * guided + z + 2 + c)
    torch.testing.assert_close(out.terms["target"], target, rtol=1e-12, atol=1e-12)
    # The `zero` option (h = 0 for u_c, u_∅) gives another target here (h ≠ 0 on both rows).
    zero = MeanFlowLoss(MeanFlowLossConfig(use_cfg_meanflow=True, cfg_omega=omega, cfg_kappa=kappa,
                                           cfg_velocity_interval="zero"))
    other = zero(_LinearStudent(), _LinearStudent(), _Teacher(), x0, inputs, uncond, noise=noise, t=t, r=r,
                 drop=torch.tensor([False, False]))
    assert (other.terms["target"] - target).abs().max() > 1e-2


def test_bad_cfg_velocity_interval_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"--cfg_velocity_interval 'h' is not one of interval, zero"):
        MeanFlowLoss(MeanFlowLossConfig(cfg_velocity_interval="h"))


# ------------------------------------------------------------------------------------------ flag defaults
def _parse(module: str, extra: list[str], tmp_path: Path):
    rescaled = tmp_path / "rescaled.pt"
    rescaled.touch()
    argv = ["--pretrained_model_name_or_path", "Freepik/flux.1-lite-8B", "--output_dir", str(tmp_path / "o")]
    if module != "train_rescale":
        argv += ["--rescaled_checkpoint_path", str(rescaled)]
    return __import__(module).parse_args(argv + extra)


# Values of the original release as run: its launch scripts' flags where they set them, else its argparse defaults.
RELEASE_TRAINING = dict(pretrained_model_name_or_path="Freepik/flux.1-lite-8B", resolution=512, train_batch_size=8,
                        gradient_accumulation_steps=1, learning_rate=1e-5, lr_scheduler="constant",
                        lr_warmup_steps=500, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-4,
                        adam_epsilon=1e-8, max_grad_norm=1.0, max_sequence_length=256, checkpointing_steps=1000,
                        report_to="tensorboard", center_crop=True, random_flip=False, caption_column="llava",
                        image_column="image", dataset_name="brivangl/midjourney-v6-llava",
                        data_files=["data/train_000.parquet", "data/train_001.parquet", "data/train_002.parquet"])
RELEASE_SCM = dict(sigma_data=0.5, logit_mean=0.2, logit_std=1.6, scm_cfg_scale=(4.0, 4.5, 5.0),
                   tangent_warmup_steps=4000, tangent_norm_eps=0.1, scm_lambda=1.0, logvar_input="trig_time")
RELEASE_MEANFLOW = dict(cfg_scale=(4.0, 4.5, 5.0), time_sampler="logit_normal", time_mu=-0.4, time_sigma=1.0,
                        ratio_r_not_equal_t=0.75, adaptive_p=1.0, cfg_omega=1.0, cfg_kappa=0.0, cfg_min_t=0.0,
                        cfg_max_t=1.0, use_cfg_meanflow=False, path_type="linear", weighting="adaptive",
                        cfg_prob=0.1, dual_time_init="copy", jvp_velocity="data", cfg_velocity_interval="interval")


@pytest.mark.parametrize("module, method", [("train_sCM", RELEASE_SCM), ("train_meanflow", RELEASE_MEANFLOW)])
def test_trainer_defaults_are_the_release(module, method, tmp_path):
    args = _parse(module, [], tmp_path)
    got = {k: getattr(args, k) for k in {**RELEASE_TRAINING, **method}}
    assert got == {**RELEASE_TRAINING, **method}


def test_scm_method_gets_the_logvar_option(tmp_path):
    assert SCMMethod.from_args(_parse("train_sCM", [], tmp_path)).logvar_input == "trig_time"
    assert SCMMethod.from_args(_parse("train_sCM", ["--logvar_input", "flow_time"], tmp_path)).logvar_input == "flow_time"


@pytest.mark.parametrize("method, steps, guidance", [("scm", 2, 4.5), ("meanflow", 4, 3.5), ("teacher", 28, 3.5)])
def test_sampler_defaults(method, steps, guidance):
    from model.sampling_cli import parse_args

    argv = ["--output_dir", "o"] + ([] if method == "teacher" else ["--resume_path", "x.pt"])
    args = parse_args(method, argv)
    # Release README (sCM 2 steps at 4.5, MeanFlow 4 at 3.5) and geneval_flux8b.sh (28 at 3.5); 4 images a prompt,
    # 256 T5 tokens, 512², seed 42 as its GenEval scripts.
    assert (args.num_inference_steps, args.guidance_scale) == (steps, guidance)
    assert (args.n_samples, args.max_sequence_length, args.resolution, args.seed) == (4, 256, 512, 42)
    assert args.pretrained_model_name_or_path == "Freepik/flux.1-lite-8B"


# -------------------------------------------------------------------------- the scripts' effective clip
def _fake_python(tmp_path: Path, gpus: int) -> Path:
    """A PYTHON for the launch scripts: answers the GPU probe, records the trainer's argv instead of running."""
    stub = tmp_path / "python"
    stub.write_text("#!/usr/bin/env bash\n"
                    f'if [ "$1" = "-c" ]; then echo {gpus}; exit 0; fi\n'
                    f'printf "%s\\n" "$@" > "{tmp_path}/argv.txt"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return stub


def _script_args(tmp_path: Path, script: str, positional: list[str], extra: list[str], env: dict):
    run_env = {**os.environ, "PYTHON": str(_fake_python(tmp_path, env.pop("gpus"))), **env}
    subprocess.run(["bash", str(REPO / "script" / script), *positional, *extra], check=True, env=run_env,
                   capture_output=True, text=True)
    argv = (tmp_path / "argv.txt").read_text().splitlines()
    entry = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    module = Path(argv[entry]).stem
    return __import__(module).parse_args(argv[entry + 1:])


SCRIPTS = [("train_sCM.sh", ["1e-6", "512", "8", "OUT", "RESCALED"]),
           ("train_meanflow.sh", ["1e-6", "512", "8", "True", "1.0", "0.5", "0.0", "1.0", "OUT", "RESCALED"])]


@pytest.mark.parametrize("script, positional", SCRIPTS)
def test_scripts_clip_at_the_release_effective_1_under_deepspeed_and_ddp(script, positional, tmp_path):
    from training.launch import _deepspeed_plugin

    rescaled = tmp_path / "rescaled.pt"
    rescaled.touch()
    positional = [str(tmp_path / "out") if p == "OUT" else str(rescaled) if p == "RESCALED" else p for p in positional]
    args = _script_args(tmp_path, script, positional, [], {"gpus": 8})  # GPU node: DeepSpeed by default
    assert args.ds_file.endswith("parallel_config/deepspeed_bf16_batch8.json") and args.max_grad_norm == 1.0
    assert _deepspeed_plugin(args).deepspeed_config["gradient_clipping"] == 1.0  # not the config's "auto"
    # An explicit --max_grad_norm still wins, and reaches DeepSpeed.
    args = _script_args(tmp_path, script, positional, ["--max_grad_norm", "0.1"], {"gpus": 8})
    assert args.max_grad_norm == 0.1 and _deepspeed_plugin(args).deepspeed_config["gradient_clipping"] == 0.1
    # Plain DDP (DS_FILE=none): the same effective clip, applied by the core's clip_grad_norm_.
    args = _script_args(tmp_path, script, positional, [], {"gpus": 8, "DS_FILE": "none"})
    assert args.ds_file is None and args.max_grad_norm == 1.0
