"""Benchmark: how much the time tangent dominates the JVP, stock ×1000 inputs vs rescaled ×1 inputs.

For a FLUX velocity v(z, t) (guidance and text fixed) at z_t = (1 − t)·x₀ + t·ε, two directional derivatives:
    time tangent  J·(0, 1) = ∂v/∂t                 (what sCM/MeanFlow's JVP carries in its time slot)
    x tangent     J·(v, 0) = (∂v/∂z)·v              (the state moving along the velocity)
and the ratio ‖J·(0, 1)‖ / ‖J·(v, 0)‖ (norms per sample, averaged).  For the stock model the time input
is embedded as sin/cos(1000·t·ω), so ∂v/∂t carries a factor up to 1000; the rescaled model embeds
sin/cos(t·ω).  The "rescaled" model is the stock weights fed ×1 inputs (a rescale run's step 0) unless
``--rescaled_checkpoint_path`` gives trained ones.

    python benchmarks/jvp_time_tangent.py                      # tiny FLUX (the tiny pipeline's sizes), CPU
    python benchmarks/jvp_time_tangent.py --size lite --device cuda --dtype bfloat16 --resolution 512
    python benchmarks/jvp_time_tangent.py --pretrained_model_name_or_path PIPE --rescaled_checkpoint_path R

``--size lite`` builds a randomly initialised transformer with FLUX.1-lite-8B's shape (8 double + 38 single
blocks, 24 heads × 128, T5 4096, CLIP 768, guidance embedding) directly on the device.  Prints a table and
writes JSON (``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LITE = dict(in_channels=64, num_layers=8, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def tiny_config() -> dict:
    from data.tiny_flux import TinyFluxConfig

    c = TinyFluxConfig()
    return dict(in_channels=c.transformer_in_channels, num_layers=c.num_layers, num_single_layers=c.num_single_layers,
                attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
                joint_attention_dim=c.joint_attention_dim, pooled_projection_dim=c.pooled_projection_dim,
                guidance_embeds=c.guidance_embeds, axes_dims_rope=tuple(c.axes_dims_rope))


def build_models(args, device, dtype):
    """(stock ×1000 model, rescaled ×1 model) with identical weights unless a rescaled checkpoint is given."""
    import torch

    from model.loading import load_flux_transformer, load_transformer_weights
    from model.transformer import DistillFluxTransformer2DModel

    if args.pretrained_model_name_or_path:
        stock = load_flux_transformer(args.pretrained_model_name_or_path, 1000.0, dtype=dtype).to(device)
    else:
        config = LITE if args.size == "lite" else tiny_config()
        torch.manual_seed(args.seed)
        with torch.device(device):  # random init directly on the device (an 8B model would take minutes on CPU)
            stock = DistillFluxTransformer2DModel(**config, timestep_scale=1000.0)
        stock = stock.to(dtype)
    rescaled = DistillFluxTransformer2DModel.from_config({**stock.config, "timestep_scale": 1.0}).to(device, dtype)
    if args.rescaled_checkpoint_path:
        load_transformer_weights(rescaled, args.rescaled_checkpoint_path)
    else:
        rescaled.load_state_dict(stock.state_dict())
    return stock.eval().requires_grad_(False), rescaled.eval().requires_grad_(False)


def random_inputs(config, batch: int, resolution: int, text_len: int, seed: int, device):
    import torch

    from model.trigflow import FluxInputs

    g = torch.Generator().manual_seed(seed)
    side = resolution // 16  # VAE /8, then 2×2 packing
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    inputs = FluxInputs(torch.randn(batch, text_len, config.joint_attention_dim, generator=g).to(device),
                        torch.randn(batch, config.pooled_projection_dim, generator=g).to(device),
                        torch.zeros(text_len, 3, device=device), ids.reshape(-1, 3).to(device),
                        torch.full((batch,), 3.5, device=device) if config.guidance_embeds else None)
    x0 = torch.randn(batch, side * side, config.in_channels, generator=g).to(device)
    noise = torch.randn(batch, side * side, config.in_channels, generator=g).to(device)
    return x0, noise, inputs


def measure(model, x0, noise, inputs, t_value: float) -> dict:
    """Per-sample norms of J·(0, 1) and J·(v, 0) at flow time ``t_value`` (RMS over latent elements)."""
    import torch

    from model.trigflow import flow_velocity

    b = x0.shape[0]
    t = torch.full((b,), t_value, device=x0.device)
    z = (1 - t_value) * x0 + t_value * noise
    f = lambda zz, tt: flow_velocity(model, zz, tt, inputs)
    with torch.no_grad():
        v = f(z, t)
        start = time.perf_counter()
        _, d_time = torch.func.jvp(f, (z, t), (torch.zeros_like(z), torch.ones_like(t)))
        if z.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        _, d_x = torch.func.jvp(f, (z, t), (v, torch.zeros_like(t)))
    rms = lambda a: (a.float().flatten(1).square().mean(1).sqrt())
    nt, nx, nv = rms(d_time), rms(d_x), rms(v)
    return {"t": t_value, "time_tangent_rms": float(nt.mean()), "x_tangent_rms": float(nx.mean()),
            "ratio_time_over_x": float((nt / nx).mean()), "velocity_rms": float(nv.mean()), "jvp_seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=["tiny", "lite"], default="tiny",
                   help="Random transformer shape: tiny (the tiny pipeline's) or lite (FLUX.1-lite-8B; use a GPU).")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Use this FLUX pipeline's transformer weights instead of a random model.")
    p.add_argument("--rescaled_checkpoint_path", default=None,
                   help="Trained rescaled weights for the x1 model (default: the stock weights fed x1 inputs).")
    p.add_argument("--times", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9], help="Flow times t.")
    p.add_argument("--resolution", type=int, default=128, help="Pixels per side (tokens = (res/16)^2).")
    p.add_argument("--batch", type=int, default=2, help="Samples per JVP.")
    p.add_argument("--text_len", type=int, default=16, help="Text tokens.")
    p.add_argument("--jvp_attention", choices=["chunked", "math"], default="chunked", help="JVP attention.")
    p.add_argument("--device", default=None, help="Torch device (default: cuda if available, else cpu).")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="Model dtype.")
    p.add_argument("--seed", type=int, default=0, help="Seed of weights and inputs.")
    p.add_argument("--json", default=None, help="Write the results to this JSON file.")
    args = p.parse_args(argv)
    if args.resolution <= 0 or args.resolution % 16:
        p.error("--resolution must be a positive multiple of 16")
    if not all(0 < t < 1 for t in args.times):
        p.error("--times must lie in (0, 1)")

    import torch

    sys.path.insert(0, str(ROOT))
    from model.attention import set_jvp_attention

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    stock, rescaled = build_models(args, device, dtype)
    x0, noise, inputs = random_inputs(stock.config, args.batch, args.resolution, args.text_len, args.seed, device)
    results = {"size": args.size if not args.pretrained_model_name_or_path else args.pretrained_model_name_or_path,
               "rescaled": args.rescaled_checkpoint_path or "stock weights, x1 inputs (step 0)",
               "params": sum(q.numel() for q in stock.parameters()), "tokens": x0.shape[1], "batch": args.batch,
               "device": str(device), "dtype": args.dtype, "models": {}}
    for name, model in (("stock_x1000", stock), ("rescaled_x1", rescaled)):
        set_jvp_attention(model, args.jvp_attention)
        measure(model, x0, noise, inputs, args.times[0])  # warm-up, so jvp_seconds excludes one-off costs
        rows = [measure(model, x0, noise, inputs, t) for t in args.times]
        results["models"][name] = {"rows": rows,
                                   "mean_time_tangent_rms": sum(r["time_tangent_rms"] for r in rows) / len(rows),
                                   "mean_x_tangent_rms": sum(r["x_tangent_rms"] for r in rows) / len(rows),
                                   "mean_ratio_time_over_x": sum(r["ratio_time_over_x"] for r in rows) / len(rows)}
    s, r = results["models"]["stock_x1000"], results["models"]["rescaled_x1"]
    results["time_tangent_stock_over_rescaled"] = s["mean_time_tangent_rms"] / r["mean_time_tangent_rms"]

    print(f"JVP tangents of {results['size']} FLUX ({results['params'] / 1e6:.2f}M params, {results['tokens']} tokens, "
          f"batch {args.batch}, {args.dtype}, {device}); RMS over latent elements, mean over the batch")
    print(f"{'model':<13} {'t':>5} {'|J(0,1)|':>11} {'|J(v,0)|':>11} {'ratio':>9} {'|v|':>9} {'jvp s':>8}")
    for name, entry in results["models"].items():
        for row in entry["rows"]:
            print(f"{name:<13} {row['t']:>5.2f} {row['time_tangent_rms']:>11.4e} {row['x_tangent_rms']:>11.4e} "
                  f"{row['ratio_time_over_x']:>9.3f} {row['velocity_rms']:>9.4f} {row['jvp_seconds']:>8.4f}")
        print(f"{name:<13} {'mean':>5} {entry['mean_time_tangent_rms']:>11.4e} {entry['mean_x_tangent_rms']:>11.4e} "
              f"{entry['mean_ratio_time_over_x']:>9.3f}")
    print(f"time tangent, stock / rescaled: {results['time_tangent_stock_over_rescaled']:.1f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json).with_name(f".{Path(args.json).name}.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, args.json)
        print(f"written {args.json}")
    return results


if __name__ == "__main__":
    main()
