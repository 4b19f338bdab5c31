"""The teacher's VAE: training on rendered shapes, latent normalisation, the reconstruction check, and the
build stage that trains it, resumes it from the state folder or reuses another teacher's."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from evaluation.shapes.teacher_build.common import BUILD_INFO_NAME, progress_bar, to_pixels, warmup_cosine_lr
from evaluation.shapes.teacher_build.recipes import TeacherConfig, vae_key
from evaluation.shapes.teacher_build.state import read_build_info


def train_vae(vae, images: np.ndarray, config: TeacherConfig, progress: bool = True,
              log: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Train ``vae`` in place on uint8 ``images`` (see module doc for the loss). Returns the loss log.

    AdamW, 5 % linear warm-up then cosine decay (:func:`warmup_cosine_lr`), gradient clipping at 1. Batches are
    drawn with a generator seeded from ``config.seed``; the reparameterised sample uses the global RNG
    (seeded by the caller).
    """
    import torch

    if config.vae_steps == 0:
        return []
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    warmup = max(1, config.vae_steps // 20)
    gen = torch.Generator().manual_seed(config.seed * 7919 + 1)
    history = []
    bar = progress_bar(config.vae_steps, "VAE steps", progress)
    for step in range(1, config.vae_steps + 1):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(step - 1, config.vae_steps, warmup, config.vae_learning_rate, 0.02)
        idx = torch.randint(len(images), (config.vae_batch_size,), generator=gen)
        x = to_pixels(images[idx.numpy()])
        posterior = vae.encode(x).latent_dist
        z = posterior.sample()
        recon = vae.decode(z).sample
        rec = (recon - x).abs().mean()
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec + config.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.update(1)
        if step % 50 == 0 or step == config.vae_steps:
            entry = {"step": step, "l1": rec.item(), "kl": kl.item()}
            history.append(entry)
            bar.set_postfix(l1=f"{entry['l1']:.4f}")
            if log:
                log({"stage": "vae", **entry})
    bar.close()
    vae.eval().requires_grad_(False)
    return history


def vae_statistics(vae, images: np.ndarray, batch_size: int = 64) -> tuple[float, float]:
    """(shift, scale) with ``(μ(x) − shift)·scale`` of zero mean and unit std over ``images``,
    μ(x) the posterior mean (what :class:`FluxConditioner` encodes with)."""
    import torch

    total, total_sq, count = 0.0, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            z = vae.encode(to_pixels(images[start:start + batch_size])).latent_dist.mean.double()
            total += z.sum().item()
            total_sq += z.square().sum().item()
            count += z.numel()
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 1e-12))
    return float(mean), float(1.0 / std)


def vae_reconstruction_report(vae, images: np.ndarray, specs: Sequence[dict], batch_size: int = 64) -> dict:
    """Mean |error| in 8-bit units and the scorer's accuracy on VAE reconstructions of ``images``
    (the ceiling any latent model of this VAE can reach), next to its accuracy on the originals."""
    import torch

    from evaluation.shapes.scorer import detect, evaluate

    abs_err, max_err, count = 0.0, 0.0, 0
    correct = correct_gt = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            x = to_pixels(chunk)
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            rec = ((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            err = np.abs(rec.astype(np.int16) - chunk.astype(np.int16))
            abs_err += float(err.sum())
            max_err = max(max_err, float(err.max()))
            count += err.size
            for k in range(len(chunk)):
                spec = specs[start + k]
                correct += evaluate(detect(rec[k])[0], spec)[0]
                correct_gt += evaluate(detect(chunk[k])[0], spec)[0]
    n = len(images)
    return {"images": n, "mean_abs_error_8bit": abs_err / count, "max_abs_error_8bit": max_err,
            "scorer_accuracy_reconstructed": correct / n, "scorer_accuracy_original": correct_gt / n}



def vae_stage(pipe, images, check_images, check_specs, config: TeacherConfig, state_dir: Path,
              reuse_vae_from: Optional[Path], progress: bool, log) -> tuple[dict, str]:
    """Train the VAE, or take it from ``state_dir`` (a resumed build) or ``reuse_vae_from``; it is kept in
    ``state_dir/vae`` with its report (reconstruction check and where it came from). Returns (report, source)."""
    from diffusers import AutoencoderKL

    saved = state_dir / "vae"
    report_path = saved / "vae_report.json"
    if report_path.is_file() and (saved / "config.json").is_file():
        pipe.vae = AutoencoderKL.from_pretrained(saved).eval().requires_grad_(False)
        report = json.loads(report_path.read_text(encoding="utf-8"))
        return {k: v for k, v in report.items() if k != "source"}, report.get("source", "trained")
    if reuse_vae_from is not None:
        report, source = _reuse_vae(pipe, reuse_vae_from, check_images, check_specs, config)
    else:
        report, source = _train_vae_stage(pipe, images, check_images, check_specs, config, progress, log)
    pipe.vae.save_pretrained(saved)
    report_path.write_text(json.dumps({**report, "source": source}, indent=2) + "\n", encoding="utf-8")
    return report, source


def _reuse_vae(pipe, reuse_vae_from: Path, check_images, check_specs, config: TeacherConfig) -> tuple[dict, str]:
    """Take the VAE of the teacher folder ``reuse_vae_from``, refusing one built with other VAE settings."""
    from diffusers import AutoencoderKL

    info = read_build_info(reuse_vae_from)
    if info is None or vae_key(info.get("config", {})) != vae_key(config.to_dict()):
        raise ValueError(f"--reuse_vae_from {reuse_vae_from}: its VAE was built with other VAE settings (or it "
                         f"has no {BUILD_INFO_NAME}); drop the flag to train the VAE")
    pipe.vae = AutoencoderKL.from_pretrained(Path(reuse_vae_from) / "vae").eval().requires_grad_(False)
    source = f"reused from {Path(reuse_vae_from).name} (same VAE settings)"
    report = {**vae_reconstruction_report(pipe.vae, check_images, check_specs),
              "shift_factor": pipe.vae.config.shift_factor, "scaling_factor": pipe.vae.config.scaling_factor,
              "final_l1": info.get("vae", {}).get("final_l1")}
    return report, source


def _train_vae_stage(pipe, images, check_images, check_specs, config: TeacherConfig, progress: bool,
                     log) -> tuple[dict, str]:
    """Train ``pipe.vae`` (global RNG seeded from ``config.seed``) and set FLUX's latent shift/scale from it."""
    import torch

    torch.manual_seed(config.seed)
    history = train_vae(pipe.vae, images, config, progress, log)
    shift, scale = vae_statistics(pipe.vae, images[:4096])
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    report = {**vae_reconstruction_report(pipe.vae, check_images, check_specs), "shift_factor": shift,
              "scaling_factor": scale, "final_l1": history[-1]["l1"] if history else None}
    return report, "trained"
