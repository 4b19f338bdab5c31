"""Sampling latency per image: few-step students (NFE 1, 2, 4) vs the teacher (NFE 28), and where the
time of a 1-step sample goes (text encoding, one transformer forward, VAE decode).

    python benchmarks/sampling_latency.py                      # tiny random FLUX on CPU (built offline)
    python benchmarks/sampling_latency.py --pretrained_model_name_or_path PIPE --resolution 512
    python benchmarks/sampling_latency.py --flux_lite_shapes --device cuda --dtype bf16   # GPU only

Every figure is the median (or ``--statistic min``) over ``--repeats`` timed runs after ``--warmup`` untimed ones, divided by
the batch size; CUDA is synchronised around each run.  The students and the teacher share one
transformer (random weights are fine: latency does not depend on their values), so the NFE ratio is
the only difference.  ``--flux_lite_shapes`` builds FLUX.1-lite-8B-sized modules with random weights —
transformer (8 double + 38 single blocks, 24 heads × 128, joint_attention_dim 4096, pooled 768, guidance
embedding), T5-XXL encoder, CLIP-L text model and the FLUX VAE — so the figures match the real model's
compute at 512² without downloading it; it needs a GPU with ~40 GB.  Writes ``--output`` JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

FLUX_LITE_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=8, num_single_layers=38, attention_head_dim=128,
                             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                             guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
              relative_attention_num_buckets=32, vocab_size=32128, is_encoder_decoder=False)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="FLUX pipeline folder/hub id; default: the tiny random pipeline (built offline in a temp dir).")
    p.add_argument("--flux_lite_shapes", action="store_true",
                   help="FLUX.1-lite-8B-sized random modules instead of a pipeline (GPU machines only).")
    p.add_argument("--resolution", type=int, default=None, help="Default: 64 for the tiny pipeline, 512 otherwise.")
    p.add_argument("--batch_size", type=int, default=1, help="Images per pipeline call.")
    p.add_argument("--student_nfe", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--teacher_nfe", type=int, default=28)
    p.add_argument("--max_sequence_length", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--statistic", choices=["median", "min"], default="median",
                   help="Summary of the timed runs; min is the better estimate on a shared, noisy CPU machine.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="Default: bf16 on CUDA, fp32 on CPU.")
    p.add_argument("--dry_run", action="store_true",
                   help="With --flux_lite_shapes: build the modules on the meta device, print sizes, exit (no memory).")
    p.add_argument("--num_blocks", type=int, nargs=2, default=None, metavar=("DOUBLE", "SINGLE"),
                   help="With --flux_lite_shapes: override the block counts (and use 1 T5 layer) to smoke-test the "
                        "path on a CPU at full width; the figures are then not FLUX.1-lite's.")
    p.add_argument("--output", default="sampling_latency.json", help="JSON file for the results.")
    args = p.parse_args(argv)
    args.resolution = args.resolution or (64 if args.pretrained_model_name_or_path is None and not args.flux_lite_shapes else 512)
    args.dtype = DTYPES[args.dtype or ("bf16" if str(args.device).startswith("cuda") else "fp32")]
    if args.flux_lite_shapes and args.pretrained_model_name_or_path:
        p.error("--flux_lite_shapes builds its own modules; drop --pretrained_model_name_or_path")
    return args


def _randomise_(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """Meta-built module → real storage on ``device`` with small random values (values do not change latency)."""
    module = torch.nn.Module.to(module, dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        for name, b in module.named_buffers():
            if name.endswith("position_ids"):  # CLIP's non-persistent index buffer: must be 0..n-1
                b.copy_(torch.arange(b.shape[-1], device=b.device).expand_as(b))
            else:
                b.zero_()
    return module.eval().requires_grad_(False)


def _flux_lite_components(tiny_dir: Path, device, dtype, dry_run: bool, num_blocks=None):
    """FLUX.1-lite-sized random transformer, VAE, T5-XXL and CLIP-L; tokenizers from the tiny pipeline."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from model.transformer import DistillFluxTransformer2DModel

    tf_config, t5_config = dict(FLUX_LITE_TRANSFORMER), dict(T5_XXL)
    if num_blocks:
        tf_config.update(num_layers=num_blocks[0], num_single_layers=num_blocks[1])
        t5_config.update(num_layers=1)
    with torch.device("meta"):
        transformer = DistillFluxTransformer2DModel(**tf_config, timestep_scale=1.0)
        vae = AutoencoderKL(**FLUX_VAE)
        t5 = T5EncoderModel(T5Config(**t5_config))
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in
             dict(transformer=transformer, vae=vae, text_encoder_2=t5, text_encoder=clip).items()}
    print("parameters: " + ", ".join(f"{k} {v / 1e9:.3f}B" for k, v in sizes.items()), flush=True)
    if dry_run:
        return None, sizes
    components = dict(
        transformer=_randomise_(transformer, device, dtype), vae=_randomise_(vae, device, dtype),
        text_encoder_2=_randomise_(t5, device, dtype), text_encoder=_randomise_(clip, device, dtype),
        # Token ids of the tiny tokenizers are valid indices of the big embeddings; padding to
        # max_length makes the encoders' cost the real one.
        tokenizer=CLIPTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer"),
        tokenizer_2=T5TokenizerFast.from_pretrained(tiny_dir, subfolder="tokenizer_2"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_dir, subfolder="scheduler"))
    return components, sizes


def _pipeline_components(pretrained: str, device, dtype):
    from diffusers import FluxPipeline

    from model.loading import load_flux_transformer

    base = FluxPipeline.from_pretrained(pretrained, transformer=None, dtype=dtype)
    transformer = load_flux_transformer(pretrained, 1.0, dtype=dtype)
    comps = {k: v for k, v in base.components.items() if k in ("vae", "text_encoder", "text_encoder_2", "tokenizer",
                                                                  "tokenizer_2", "scheduler")}
    comps["transformer"] = transformer
    for m in comps.values():
        if isinstance(m, torch.nn.Module):
            m.to(device).eval().requires_grad_(False)
    return comps


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device, warmup: int, repeats: int, statistic: str) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times) if statistic == "min" else statistics.median(times)


@torch.no_grad()
def run(args) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, SCMScheduler

    from data.tiny_flux import ensure_tiny_assets
    from model.pipeline import MeanFlowFluxPipeline, SCMFluxPipeline

    tmp = tempfile.TemporaryDirectory(prefix="latency-")
    tiny_dir = None
    if args.pretrained_model_name_or_path is None:
        tiny_dir, _ = ensure_tiny_assets(tmp.name)
    if args.flux_lite_shapes:
        comps, sizes = _flux_lite_components(tiny_dir, args.device, args.dtype, args.dry_run, args.num_blocks)
        if comps is None:
            return {"parameters": sizes}
        source = "FLUX.1-lite-8B shapes, random weights" + (f", blocks {args.num_blocks}" if args.num_blocks else "")
    else:
        comps = _pipeline_components(args.pretrained_model_name_or_path or str(tiny_dir), args.device, args.dtype)
        source = args.pretrained_model_name_or_path or "tiny random FLUX (data.tiny_flux)"
    teacher_scheduler = comps.pop("scheduler")
    teacher = FluxPipeline(scheduler=teacher_scheduler, **comps)
    scm = SCMFluxPipeline(scheduler=SCMScheduler(prediction_type="trigflow", sigma_data=0.5), **comps)
    meanflow = MeanFlowFluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(teacher_scheduler.config),
                                    **comps)
    for pipe in (teacher, scm, meanflow):
        pipe.set_progress_bar_config(disable=True)

    res, bsz, device = args.resolution, args.batch_size, args.device
    prompts = ["a photo of a red circle left of a blue square"] * bsz
    seq = args.max_sequence_length
    gen = lambda: [torch.Generator("cpu").manual_seed(i) for i in range(bsz)]
    call = dict(height=res, width=res, max_sequence_length=seq, output_type="pil")
    results: dict = {"source": source, "device": str(device), "dtype": str(args.dtype).replace("torch.", ""),
                     "resolution": res, "batch_size": bsz, "max_sequence_length": seq,
                     "repeats": args.repeats, "warmup": args.warmup, "statistic": args.statistic,
                     "seconds_per_image": {}}
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name(device)

    def timed(fn):
        return _time(fn, device, args.warmup, args.repeats, args.statistic) / bsz

    # Components of one sample, timed alone on the same shapes (student forward: t, guidance; no interval).
    tf, vae = comps["transformer"], comps["vae"]
    embeds, pooled, text_ids = scm.encode_prompt(prompts, None, device=device, max_sequence_length=seq)
    latents, img_ids = scm.prepare_latents(bsz, tf.config.in_channels // 4, res, res, args.dtype, device, gen())
    t, g = torch.ones(bsz, device=device), torch.full((bsz,), 4.5, device=device)
    unpacked = scm._unpack_latents(latents, res, res, scm.vae_scale_factor).to(vae.dtype)
    comp = {
        "text_encode": timed(lambda: scm.encode_prompt(prompts, None, device=device, max_sequence_length=seq)),
        "transformer_forward": timed(lambda: tf(latents, timestep=t, guidance=g, encoder_hidden_states=embeds,
                                                pooled_projections=pooled, txt_ids=text_ids, img_ids=img_ids,
                                                return_dict=False)),
        "vae_decode": timed(lambda: vae.decode(unpacked, return_dict=False)),
        "decode_and_postprocess": timed(lambda: scm.image_processor.postprocess(
            vae.decode(unpacked, return_dict=False)[0], output_type="pil")),
    }
    results["components_seconds_per_image"] = comp
    print("components: " + ", ".join(f"{k} {v:.4f} s/img" for k, v in comp.items()), flush=True)

    per_image = results["seconds_per_image"]
    for nfe in args.student_nfe:
        per_image[f"scm_nfe{nfe}"] = timed(lambda: scm(prompts, num_inference_steps=nfe, generator=gen(), **call))
        print(f"sCM NFE {nfe}: {per_image[f'scm_nfe{nfe}']:.4f} s/img", flush=True)
    key = f"teacher_nfe{args.teacher_nfe}"
    per_image[key] = timed(lambda: teacher(prompts, num_inference_steps=args.teacher_nfe, guidance_scale=3.5,
                                           generator=gen(), **call))
    print(f"teacher NFE {args.teacher_nfe}: {per_image[key]:.4f} s/img", flush=True)
    # MeanFlow student = the same transformer plus the interval (t − r) embedder MLP.
    tf.enable_interval_embedding("copy")
    for nfe in args.student_nfe:
        per_image[f"meanflow_nfe{nfe}"] = timed(lambda: meanflow(prompts, num_inference_steps=nfe, generator=gen(), **call))
        print(f"MeanFlow NFE {nfe}: {per_image[f'meanflow_nfe{nfe}']:.4f} s/img", flush=True)

    results["teacher_over_student"] = {k: per_image[key] / v for k, v in per_image.items() if k != key}
    one = per_image.get("scm_nfe1")
    if one is not None:
        fwd_dec = comp["transformer_forward"] + comp["vae_decode"]
        everything = comp["text_encode"] + comp["transformer_forward"] + comp["decode_and_postprocess"]
        results["one_step_vs_components"] = {
            "scm_nfe1": one, "forward_plus_decode": fwd_dec, "ratio_to_forward_plus_decode": one / fwd_dec,
            "encode_forward_decode_postprocess": everything, "ratio_to_all_components": one / everything,
            "unaccounted_seconds": one - everything}
    tmp.cleanup()
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    results = run(args)
    text = json.dumps(results, indent=2)
    print(text)
    Path(args.output).write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
