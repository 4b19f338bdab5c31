"""Position pilots (issue #12): why the shapes teacher places two objects almost blind to the relation.

Both probes start from a snapshot of a staged teacher build taken after flow matching, before guidance
distillation (the CFG model, guidance input 1): ``python -m evaluation.shapes.teacher --snapshot_from STATE
--output_dir SNAP`` while ``STATE`` holds ``flow.pt`` and no ``distill.pt``.

* ``swap``: the flow-matching loss of held-out position images with the true caption, the relation-swapped
  caption (left ↔ right, above ↔ below), the objects-swapped one (subject ↔ reference) and the unconditional
  prompt, per flow time, on the same noise. A denoiser that reads the relation predicts worse with the
  swapped captions; one that reads only the words (a bag) predicts equally well. A recoloured subject
  calibrates the scale: a word the denoiser certainly reads.
* ``finetune``: continue the snapshot by flow matching for ``--steps`` (rows drawn with per-tag weights,
  optionally with identity-initialised extra blocks, optionally after teaching the text encoders where each
  object of a position prompt lies), then score held-out position, counting and two-object prompts at true CFG
  and break the failures down (:mod:`evaluation.shapes.failures`).

CLI::

    python -m evaluation.shapes.position_pilot swap --teacher SNAP
    python -m evaluation.shapes.position_pilot finetune --teacher SNAP --output_dir OUT \\
        [--steps 2000] [--tag_weights position=4,counting=2] [--grow 2,4] [--placement_from STATE/text.pt]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from evaluation.shapes.domain import COLORS, PLURALS, RELATIONS, SHAPES, TAGS
from evaluation.shapes.failures import OPPOSITE

SWAP_TIMES = (0.3, 0.6, 0.8, 0.9, 0.97)
SCORED_TAGS = ("two_object", "counting", "position")


def split_position_caption(caption: str) -> tuple[str, str, str, str]:
    """"a photo of <subject> <relation> <reference>" → (prefix, subject, relation, reference)."""
    prefix = "a photo of "
    for relation in RELATIONS:
        marker = f" {relation} "
        if caption.startswith(prefix) and marker in caption:
            subject, reference = caption[len(prefix):].split(marker, 1)
            return prefix, subject, relation, reference
    raise ValueError(f"not a position caption: {caption!r}")


def relation_swapped(caption: str) -> str:
    """The caption with the opposite relation: "a red circle left of a blue square" → "... right of ..."."""
    prefix, subject, relation, reference = split_position_caption(caption)
    return f"{prefix}{subject} {OPPOSITE[relation]} {reference}"


def objects_swapped(caption: str) -> str:
    """The caption with subject and reference exchanged: "a red circle left of a blue square" → "a blue square
    left of a red circle" (the same scene as the relation-swapped caption)."""
    prefix, subject, relation, reference = split_position_caption(caption)
    return f"{prefix}{reference} {relation} {subject}"


def subject_recoloured(caption: str) -> str:
    """The caption with the subject in the first palette colour that the caption does not name (a calibration:
    how much the denoiser relies on a word it certainly reads)."""
    prefix, subject, relation, reference = split_position_caption(caption)
    article, _, shape = subject.split(" ")
    other = next(c for c in COLORS if c not in caption.split())
    return f"{prefix}{article} {other} {shape} {relation} {reference}"


def placement_targets(tokens: Sequence[str], spec: Optional[dict]) -> list[int]:
    """Placement class of every T5 token of a caption: 0, except on the object words (colour, shape) of a position
    prompt, where it is 1 + the index in ``RELATIONS`` of where that object lies relative to the other one (the
    subject's two words: the relation; the reference's: its opposite). ``tokens`` may carry SentencePiece's word
    mark ``▁``; ``spec`` is the caption's GenEval metadata (None: the unconditional prompt)."""
    words = [t.lstrip("\u2581") for t in tokens]
    out = [0] * len(words)
    if spec is None or spec["tag"] != "position":
        return out
    object_words = set(COLORS) | set(SHAPES) | set(PLURALS.values())
    where = [i for i, w in enumerate(words) if w in object_words]
    if len(where) != 4:
        raise ValueError(f"a position caption needs 4 object words (two colours, two shapes), got {words}")
    relation = next(o["position"][0] for o in spec["include"] if "position" in o)
    for k, i in enumerate(where):
        out[i] = 1 + RELATIONS.index(relation if k < 2 else OPPOSITE[relation])
    return out


def grow_transformer(transformer, extra_double: int, extra_single: int, seed: int = 11):
    """A ``FluxTransformer2DModel`` with ``extra_double``/``extra_single`` blocks appended after the existing
    double-/single-stream blocks, the old weights copied and the new blocks made the identity by adaLN-Zero
    (their modulation layers zeroed: every residual branch gated by 0), so it computes the same function."""
    import torch
    from diffusers import FluxTransformer2DModel

    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    config["num_layers"] += extra_double
    config["num_single_layers"] += extra_single
    torch.manual_seed(seed)
    grown = FluxTransformer2DModel.from_config(config)
    _, unexpected = grown.load_state_dict(transformer.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"unexpected weights when growing the transformer: {unexpected[:3]}")
    new_layers = [layer for block in grown.transformer_blocks[transformer.config.num_layers:]
                  for layer in (block.norm1.linear, block.norm1_context.linear)]
    new_layers += [block.norm.linear for block in grown.single_transformer_blocks[transformer.config.num_single_layers:]]
    for layer in new_layers:
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return grown.to(transformer.dtype)


def parse_tag_weights(text: str) -> dict[str, float]:
    """"position=4,counting=2" → {"position": 4.0, "counting": 2.0} (tags not named weigh 1)."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        tag, _, value = item.partition("=")
        if tag not in TAGS or not value:
            raise ValueError(f"--tag_weights: expected TAG=WEIGHT with TAG among {', '.join(TAGS)}, got {item!r}")
        weights[tag] = float(value)
        if weights[tag] < 0:
            raise ValueError(f"--tag_weights: weights must be >= 0, got {item!r}")
    if weights and all(weights.get(t, 1.0) == 0 for t in TAGS):
        raise ValueError("--tag_weights: every tag has weight 0; nothing to train on")
    return weights


class PilotData:
    """The teacher recipe's training rows through a snapshot's own VAE and text encoders: latents, the sorted
    unique captions, their metadata and the FLUX ids (what :func:`finetune` and :func:`teach_placement` read)."""

    def __init__(self, pipe, config, progress: bool = True):
        from evaluation.shapes.domain import generate_examples
        from evaluation.shapes.teacher_build.common import UNCONDITIONAL_PROMPT, images_from_rows
        from evaluation.shapes.teacher_build.flow import encode_latents
        from model.flux_io import FluxConditioner

        self.config = config
        self.rows = generate_examples(config.num_images, config.resolution, config.seed, "train", progress=False)
        self.conditioner = FluxConditioner(pipe, "cpu", config.max_sequence_length)
        self.latents = encode_latents(self.conditioner, images_from_rows(self.rows), progress=progress)
        spec_of = {r["llava"]: json.loads(r["metadata"]) for r in self.rows}
        self.unique = sorted(spec_of)
        self.specs = [spec_of[c] for c in self.unique]
        lookup = {c: i for i, c in enumerate(self.unique)}
        import torch

        self.caption_index = torch.tensor([lookup[r["llava"]] for r in self.rows])
        self.tags = [json.loads(r["metadata"])["tag"] for r in self.rows]
        self.txt_ids = self.conditioner.encode_prompts([UNCONDITIONAL_PROMPT])[2]
        self.img_ids = self.conditioner.image_ids(config.resolution, config.resolution)


def teach_placement(pipe, data: PilotData, text_state: dict, steps: int, learning_rate: float = 5e-4,
                    seed: int = 7) -> dict:
    """Continue the caption-parsing pretraining of ``pipe``'s encoders (the probe from ``text_state``, the text
    stage's checkpoint) with a per-token placement head (:func:`placement_targets`)::

        L = CE(probe(T5 tokens)) + CE(probe(pooled CLIP)) + mean over tokens CE(head(T5 token), placement)

    Position captions are drawn 4× as often. The encoders keep the EMA; the probe and head are discarded.
    Returns the head's accuracy on the object words of held-out position prompts (they were never trained on)."""
    import torch
    import torch.nn.functional as F

    from evaluation.shapes.domain import heldout_specs
    from evaluation.shapes.teacher_build.optim import load_ema, optimise
    from evaluation.shapes.teacher_build.text import (TrainableText, caption_probe_class, caption_probe_loss,
                                                      caption_targets)

    t5, clip = pipe.text_encoder_2, pipe.text_encoder
    probe = caption_probe_class()(t5.config.d_model, clip.config.hidden_size)
    load_ema({"text_encoder": clip, "text_encoder_2": t5, "probe": probe}, text_state)
    torch.manual_seed(seed)
    head = torch.nn.Linear(t5.config.d_model, 1 + len(RELATIONS))
    text = TrainableText(pipe, data.unique, data.config.max_sequence_length)
    specs = data.specs + [None]
    parse_targets = torch.tensor([caption_targets(s) for s in specs])
    place_targets = _placement_rows(text, pipe.tokenizer_2, specs)
    weights = torch.tensor([4.0 if s and s["tag"] == "position" else 1.0 for s in specs])
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(step: int):
        idx = torch.multinomial(weights, 64, replacement=True, generator=gen)
        tokens, pooled = text.encode(idx)
        t5_logits, clip_logits = probe(tokens, pooled)
        parse = caption_probe_loss(t5_logits, parse_targets[idx]) + caption_probe_loss(clip_logits, parse_targets[idx])
        return parse + F.cross_entropy(head(tokens).flatten(0, 1), place_targets[idx].flatten())

    modules = {"text_encoder": clip, "text_encoder_2": t5, "probe": probe, "head": head}
    result = optimise("placement", modules, loss_fn, steps, lambda s: learning_rate, gen,
                      replace(data.config, ema_decay=0.99), progress=False, log=_print_log)
    for key, module in modules.items():
        module.load_state_dict(result.ema[key])
    held = [s for s in heldout_specs(17, 0) if s["tag"] == "position"]
    held_text = TrainableText(pipe, [s["prompt"] for s in held], data.config.max_sequence_length)
    with torch.no_grad():
        predicted = head(held_text.encode(torch.arange(len(held)))[0]).argmax(-1)
    truth = _placement_rows(held_text, pipe.tokenizer_2, held)
    mask = truth > 0
    return {"heldout_placement_accuracy": (predicted[mask] == truth[mask]).float().mean().item(),
            "heldout_object_words": int(mask.sum())}


def _placement_rows(text, tokenizer, specs) -> "torch.Tensor":
    import torch

    return torch.tensor([placement_targets(tokenizer.convert_ids_to_tokens(ids.tolist()), spec)
                         for ids, spec in zip(text.t5_ids, specs)])


def finetune(pipe, data: PilotData, steps: int, learning_rate: float, tag_weights: dict, seed: int = 123,
             checkpoint: Optional[Path] = None):
    """Continue ``pipe.transformer`` by the flow stage's loss at guidance input 1 (rows drawn in proportion to
    ``tag_weights``; constant LR after 50 warm-up steps; fresh AdamW and EMA); loads the EMA. Returns the log."""
    import torch

    from evaluation.shapes.teacher_build.flow import draw_flow_batch, flow_matching_loss, tag_row_weights
    from evaluation.shapes.teacher_build.optim import optimise
    from evaluation.shapes.teacher_build.text import frozen_text

    text = frozen_text(data.conditioner, data.unique, False)
    weights = tag_row_weights(data.tags, tag_weights)
    transformer, batch = pipe.transformer, data.config.batch_size
    guidance = torch.ones(batch)
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(step: int):
        drawn = draw_flow_batch(gen, data.latents, data.caption_index, text, batch, data.config.caption_dropout,
                                weights, data.config.flow_time_shift)
        return flow_matching_loss(transformer, drawn, guidance, data.txt_ids, data.img_ids)

    result = optimise("finetune", {"transformer": transformer}, loss_fn, steps,
                      lambda s: learning_rate * min(1.0, (s + 1) / 50), gen, replace(data.config, steps=steps),
                      checkpoint, progress=False, log=_print_log)
    transformer.load_state_dict(result.ema["transformer"])
    transformer.eval()
    return result.history


def swap_losses(pipe, images: int = 96, times: Sequence[float] = SWAP_TIMES, repeats: int = 4, seed: int = 0,
                max_sequence_length: int = 16) -> dict:
    """Mean flow-matching loss per flow time of ``images`` held-out position images (rendered with seed 5) under
    the true, relation-swapped, objects-swapped, subject-recoloured and unconditional captions, on the same
    noise."""
    import torch

    from evaluation.shapes.domain import generate_examples
    from evaluation.shapes.teacher_build.common import UNCONDITIONAL_PROMPT, images_from_rows
    from evaluation.shapes.teacher_build.flow import encode_latents
    from model.flux_io import FluxConditioner

    rows = [r for r in generate_examples(30 * images, 64, 5, "heldout", progress=False)
            if json.loads(r["metadata"])["tag"] == "position"][:images]
    conditioner = FluxConditioner(pipe, "cpu", max_sequence_length)
    latents = encode_latents(conditioner, images_from_rows(rows), progress=False)
    captions = [r["llava"] for r in rows]
    variants = {"true": captions, "relation_swapped": [relation_swapped(c) for c in captions],
                "objects_swapped": [objects_swapped(c) for c in captions],
                "subject_recoloured": [subject_recoloured(c) for c in captions],
                "unconditional": [UNCONDITIONAL_PROMPT] * len(captions)}
    encoded = {name: conditioner.encode_prompts(caps) for name, caps in variants.items()}
    img_ids = conditioner.image_ids(64, 64)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for t in times:
        losses = dict.fromkeys(variants, 0.0)
        for _ in range(repeats):
            eps = torch.randn(latents.shape, generator=gen)
            z_t = (1 - t) * latents + t * eps
            for name, (embeds, pooled, txt_ids) in encoded.items():
                with torch.no_grad():
                    v = pipe.transformer(hidden_states=z_t, timestep=torch.full((len(rows),), t),
                                         guidance=torch.ones(len(rows)), encoder_hidden_states=embeds,
                                         pooled_projections=pooled, txt_ids=txt_ids, img_ids=img_ids,
                                         return_dict=False)[0]
                losses[name] += (v.float() - (eps - latents)).square().mean().item() / repeats
        out[f"{t:g}"] = losses
    return out


def _print_log(entry: dict) -> None:
    print(json.dumps(entry), flush=True)


def score(pipe, output_dir: Path, cfg: float = 4.0, prompts_per_tag: int = 17, samples: int = 4) -> dict:
    """Held-out two-object, counting and position prompts at true CFG ``cfg`` (guidance input 1, 28 steps) and the
    failure breakdown of the position and counting images (:func:`evaluation.shapes.failures.breakdown`)."""
    from evaluation.shapes.diagnose import cfg_sweep
    from evaluation.shapes.failures import breakdown
    from evaluation.shapes.stats import read_results

    sweep = cfg_sweep(pipe, [cfg], output_dir / "samples", prompts_per_tag, samples, guidance=1.0,
                      tags=SCORED_TAGS)
    row = sweep[f"{cfg:g}"]
    return {**row, "failures": breakdown(read_results(output_dir / "samples" / f"cfg_{cfg:g}"))}


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evaluation.shapes.position_pilot",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    swap = sub.add_parser("swap", help="flow loss under true vs relation-/objects-swapped captions",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tune = sub.add_parser("finetune", help="continue a flow snapshot, then score position/counting/two-object",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for q in (swap, tune):
        q.add_argument("--teacher", required=True,
                       help="FluxPipeline folder of a flow-matching snapshot (guidance input 1; see module doc)")
        q.add_argument("--output", default=None, help="JSON report to write (default: print only)")
        q.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    swap.add_argument("--images", type=int, default=96, help="held-out position images")
    tune.add_argument("--output_dir", required=True, help="folder for samples, checkpoint and report.json")
    tune.add_argument("--steps", type=int, default=2000, help="flow-matching fine-tuning steps (0: score only)")
    tune.add_argument("--learning_rate", type=float, default=2e-4, help="constant LR after 50 warm-up steps")
    tune.add_argument("--tag_weights", default="", help="row draw weights, e.g. position=4,counting=2 (others 1)")
    tune.add_argument("--grow", default="", help="D,S: append D double- and S single-stream identity blocks first")
    tune.add_argument("--placement_from", default=None,
                      help="the build's text.pt: first teach the encoders per-token placement (see teach_placement)")
    tune.add_argument("--placement_steps", type=int, default=1000, help="steps of that placement pretraining")
    tune.add_argument("--recipe", default="v4",
                      help="teacher recipe whose training rows, batch size and flow-time shift are used (the pilots "
                           "of docs/toy_benchmark/teacher_diagnosis.md ran on v4)")
    tune.add_argument("--cfg", type=float, default=4.0, help="true CFG scale of the scored samples")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse_args(argv)
    if not (Path(args.teacher) / "model_index.json").is_file():
        raise ValueError(f"--teacher {args.teacher} is not a FluxPipeline folder (no model_index.json)")
    grow = [int(x) for x in args.grow.split(",")] if getattr(args, "grow", "") else None
    if grow is not None and (len(grow) != 2 or min(grow) < 0):
        raise ValueError(f"--grow expects D,S (two counts >= 0), got {args.grow!r}")
    weights = parse_tag_weights(getattr(args, "tag_weights", ""))
    import torch
    from diffusers import FluxPipeline

    from evaluation.shapes.teacher_build.recipes import teacher_recipe

    torch.set_num_threads(args.threads)
    pipe = FluxPipeline.from_pretrained(args.teacher, dtype=torch.float32)
    if args.command == "swap":
        report = {"teacher": str(args.teacher), "swap_losses": swap_losses(pipe, args.images)}
        for t, row in report["swap_losses"].items():
            print(f"t={t}: " + ", ".join(f"{k} {v:.5f}" for k, v in row.items()))
    else:
        out = Path(args.output_dir)
        _claim_output_dir(out, {k: v for k, v in vars(args).items() if k not in ("output", "threads")})
        report, started = {"args": vars(args)}, time.perf_counter()
        if grow:
            pipe.transformer = grow_transformer(pipe.transformer, *grow)
        data = PilotData(pipe, teacher_recipe(args.recipe))
        if args.placement_from:
            state = torch.load(args.placement_from, map_location="cpu", weights_only=False)
            report["placement"] = teach_placement(pipe, data, state, args.placement_steps)
        if args.steps:
            finetune(pipe, data, args.steps, args.learning_rate, weights, checkpoint=out / "finetune.pt")
        report["train_s"] = round(time.perf_counter() - started, 1)
        report["score"] = score(pipe, out, args.cfg)
        report["swap_losses"] = swap_losses(pipe)
        _write_report(out / "report.json", report)
        f = report["score"]["failures"]
        print(f"overall {100 * report['score']['overall']:.1f}% on {report['score']['images']} images; "
              + ", ".join(f"{t} {100 * a:.1f}" for t, a in report["score"]["tasks"].items())
              + f"; relation right given both objects {100 * (f['relation_correct_given_objects'] or 0):.1f}% "
              f"(relation-blind {100 * (f['relation_blind_rate'] or 0):.1f}%)")
    if args.output:
        _write_report(Path(args.output), report)
    return 0


def _claim_output_dir(out: Path, flags: dict) -> None:
    """Record ``flags`` in ``out/flags.json``; refuse a folder that holds a run with other flags, whose
    ``finetune.pt`` the fine-tuning would otherwise resume."""
    marker = out / "flags.json"
    if marker.is_file():
        saved = json.loads(marker.read_text(encoding="utf-8"))
        if saved != flags:
            changed = sorted(k for k in set(saved) | set(flags) if saved.get(k) != flags.get(k))
            raise ValueError(f"--output_dir {out} holds a pilot run with other flags ({', '.join(changed)}); "
                             "choose an empty folder, or repeat that run's flags to resume it")
        return
    _write_report(marker, flags)


def _write_report(path: Path, report: dict) -> None:
    from training.checkpointing import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    from training.cli import run_cli

    sys.exit(run_cli(main))  # bad input: one line, status 2
