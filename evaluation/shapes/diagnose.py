"""Diagnostics of a shapes teacher (docs/toy_benchmark/teacher_diagnosis.md): what its text encoders
let the transformer see, and how it scores under classifier-free guidance.

* :func:`text_binding_report`: FLUX gives text tokens no position inside the transformer (``txt_ids`` are
  all 0, so RoPE leaves them unrotated); word order and attribute binding reach it only through the
  T5 hidden states and the pooled CLIP vector. For caption pairs that differ only in *binding* ("a red
  square and a green circle" / "a red circle and a green square") or in the *order* of a relation,
  the report gives the lowest cosine similarity between a token of one caption and its best match among
  the tokens of the other ("bag" similarity; 1.0 = the transformer receives the same set of vectors) and
  the pooled-CLIP cosine. Pairs that differ in a *word* (colour, count) are the contrast.
* :func:`cfg_sweep`: held-out GenEval-style score at several true-CFG scales (``FluxPipeline``'s
  ``true_cfg_scale`` with the unconditional prompt as negative prompt), to tell a model that knows the
  prompt but draws it weakly (CFG helps) from one that never received the information (CFG cannot help).

CLI::

    python -m evaluation.shapes.diagnose --teacher assets/shapes_teacher --cfg 1,2,4,7 --output diag.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

#: (kind, caption A, caption B): what differs between the two captions.
CAPTION_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("binding", "a photo of a red square and a green circle", "a photo of a red circle and a green square"),
    ("binding", "a photo of a blue triangle and a white square", "a photo of a blue square and a white triangle"),
    ("relation order", "a photo of a red circle left of a blue square", "a photo of a blue square left of a red circle"),
    ("relation order", "a photo of a green triangle above a yellow circle",
     "a photo of a yellow circle above a green triangle"),
    ("colour word", "a photo of a red square", "a photo of a blue square"),
    ("count word", "a photo of two green circles", "a photo of four green circles"),
)


def text_binding_report(pipe, max_sequence_length: int = 16) -> list[dict]:
    """One entry per :data:`CAPTION_PAIRS` pair: ``bag_cosine`` (min over A's tokens of the best cosine
    with B's tokens, T5 hidden states as the transformer receives them), ``changed_token_cosine`` (lowest
    same-position cosine) and ``pooled_cosine`` (CLIP)."""
    import torch

    out = []
    for kind, a, b in CAPTION_PAIRS:
        with torch.no_grad():
            enc, pooled, _ = pipe.encode_prompt([a, b], prompt_2=None, max_sequence_length=max_sequence_length)
        ea, eb = torch.nn.functional.normalize(enc[0].float(), dim=-1), torch.nn.functional.normalize(enc[1].float(), dim=-1)
        bag = (ea @ eb.T).max(dim=1).values.min().item()
        same_position = (ea * eb).sum(-1).min().item()
        pooled_cos = torch.nn.functional.cosine_similarity(pooled[0:1].float(), pooled[1:2].float()).item()
        out.append({"kind": kind, "a": a, "b": b, "bag_cosine": bag, "changed_token_cosine": same_position,
                    "pooled_cosine": pooled_cos})
    return out


def cfg_sweep(pipe, scales: Sequence[float], work_dir: Path, prompts_per_tag: int = 16, samples: int = 2,
              steps: int = 28, guidance: float = 3.5, seed: int = 0, batch_size: int = 32,
              max_sequence_length: int = 16, tags: Optional[Sequence[str]] = None) -> dict:
    """Held-out score per true-CFG scale (1 = plain conditional sampling); ``guidance`` feeds the
    guidance embedding; ``tags``: only these GenEval tags (default all). Each scale's folder keeps its
    ``results.jsonl`` (for :mod:`evaluation.shapes.failures`). Returns ``{scale: {"overall", "tasks":
    {tag: accuracy}, "images"}}``."""
    import torch

    from evaluation.generate import image_generators
    from evaluation.geneval_layout import sample_path, write_prompt_metadata
    from evaluation.shapes.domain import heldout_specs
    from evaluation.shapes.scorer import score_folder
    from evaluation.shapes.teacher import UNCONDITIONAL_PROMPT, _progress
    from evaluation.summarize_geneval import summarize_rows

    specs = [s for s in heldout_specs(prompts_per_tag, seed) if tags is None or s["tag"] in tags]
    jobs = [(i, k) for i in range(len(specs)) for k in range(samples)]
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for scale in scales:
        root = Path(work_dir) / f"cfg_{scale:g}"
        for i, spec in enumerate(specs):
            write_prompt_metadata(root, i, spec)
        bar = _progress(len(jobs), f"true CFG {scale:g}", True)
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            extra = {"true_cfg_scale": scale, "negative_prompt": [UNCONDITIONAL_PROMPT] * len(chunk)} if scale != 1 else {}
            with torch.no_grad():
                images = pipe(prompt=[specs[i]["prompt"] for i, _ in chunk], height=64, width=64,
                              num_inference_steps=steps, guidance_scale=guidance, generator=image_generators(seed, chunk),
                              max_sequence_length=max_sequence_length, output_type="pil", **extra).images
            for (i, k), image in zip(chunk, images):
                image.save(sample_path(root, i, k))
            bar.update(len(chunk))
        bar.close()
        summary = summarize_rows(score_folder(root, root / "results.jsonl"), specs)
        results[f"{scale:g}"] = {"overall": summary["overall"], "images": summary["total_images"],
                                 "tasks": {t: v["accuracy"] for t, v in summary["tasks"].items()}}
    return results


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.shapes.diagnose", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="FluxPipeline folder of a shapes teacher")
    p.add_argument("--cfg", default="", help="comma-separated true-CFG scales to score (empty: text report only)")
    p.add_argument("--prompts_per_tag", type=int, default=16, help="held-out prompts per tag for the CFG sweep")
    p.add_argument("--samples", type=int, default=2, help="samples per prompt for the CFG sweep")
    p.add_argument("--guidance", type=float, default=3.5, help="guidance-embedding input during the CFG sweep")
    p.add_argument("--work_dir", default=None, help="where the sweep's samples go (default: next to --output)")
    p.add_argument("--output", default=None, help="JSON file for the report (default: print only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine)")
    args = p.parse_args(argv)
    try:
        scales = [float(s) for s in args.cfg.split(",") if s.strip()]
    except ValueError:
        print(f"error: --cfg must be comma-separated numbers, got {args.cfg!r}", file=sys.stderr)
        return 2
    if not (Path(args.teacher) / "model_index.json").is_file():
        print(f"error: --teacher {args.teacher} is not a FluxPipeline folder (no model_index.json)", file=sys.stderr)
        return 2
    import torch
    from diffusers import FluxPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = FluxPipeline.from_pretrained(args.teacher, dtype=torch.float32)
    report = {"teacher": str(args.teacher), "text": text_binding_report(pipe)}
    for row in report["text"]:
        print(f"{row['kind']:>15}: bag cosine {row['bag_cosine']:.3f}, lowest same-position cosine "
              f"{row['changed_token_cosine']:.3f}, pooled CLIP cosine {row['pooled_cosine']:.3f}")
    if scales:
        work = Path(args.work_dir or (Path(args.output).with_suffix("") if args.output else "diagnose_samples"))
        report["cfg"] = cfg_sweep(pipe, scales, work, args.prompts_per_tag, args.samples, guidance=args.guidance)
        for scale, row in report["cfg"].items():
            tasks = ", ".join(f"{t} {100 * a:.0f}" for t, a in row["tasks"].items())
            print(f"true CFG {scale}: overall {100 * row['overall']:.1f}% on {row['images']} images ({tasks})")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    from training.cli import run_cli

    sys.exit(run_cli(main))  # bad input: one line, status 2
