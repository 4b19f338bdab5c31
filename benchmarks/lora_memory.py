"""Benchmark: memory of a full vs a LoRA student (teacher = the base with adapters off), sCM and MeanFlow.

For each (method, student) a fresh subprocess builds the models as the trainers do (full: a teacher and a
student transformer; LoRA: one transformer + adapter, ``training.lora.build_tied_models``), runs a few
optimizer steps of the method's loss (JVP included) with AdamW on CPU, and reports

* parameters: total in memory (teacher + student), trainable, and AdamW state elements (exp_avg + exp_avg_sq);
* bytes of weights + gradients + optimizer states (exact, from the tensors);
* peak extra RSS of the process over its state before the models were built (measured), and seconds/step.

``--count_only 8b`` instead counts, on the meta device, the parameters of the FLUX.1-lite-8B architecture
(8 double + 38 single blocks, 24 heads x 128) and of its LoRA adapters — no weights are allocated.

    python benchmarks/lora_memory.py --json outputs/bench/lora_memory.json
    python benchmarks/lora_memory.py --count_only 8b --ranks 16 64 256
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The "medium" CPU configuration: 4 heads x 64, 2 double + 4 single blocks.
MEDIUM = dict(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
              joint_attention_dim=128, pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(8, 28, 28))
LITE_8B = dict(in_channels=64, num_layers=8, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
               joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _inputs(batch: int, side: int, n_text: int):
    import torch

    from model.trigflow import FluxInputs

    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    latents = torch.randn(batch, side * side, MEDIUM["in_channels"], generator=g)
    inputs = FluxInputs(torch.randn(batch, n_text, MEDIUM["joint_attention_dim"], generator=g),
                        torch.randn(batch, MEDIUM["pooled_projection_dim"], generator=g), torch.zeros(n_text, 3),
                        ids.reshape(-1, 3), None)
    return latents, inputs


def _method(name: str):
    from training.meanflow import MeanFlowLoss, MeanFlowLossConfig, MeanFlowMethod
    from training.scm import SCMLoss, SCMLossConfig, SCMMethod

    if name == "scm":
        return SCMMethod(SCMLoss(SCMLossConfig(tangent_warmup_steps=1)), "chunked")
    return MeanFlowMethod(MeanFlowLoss(MeanFlowLossConfig(cfg_prob=0.0)), None, "copy", "chunked")


def _measure(method_name: str, rank: int, steps: int, batch: int, side: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from model.lora import LoraSpec, count_parameters
    from model.transformer import DistillFluxTransformer2DModel
    from training.lora import build_tied_models

    torch.manual_seed(0)
    latents, inputs = _inputs(batch, side, 32)
    method = _method(method_name)
    base_rss = _rss()
    make = lambda: DistillFluxTransformer2DModel(**MEDIUM, timestep_scale=1.0)
    if rank == 0:
        teacher_tf = make()
        student_tf = make()
        student_tf.load_state_dict(teacher_tf.state_dict())
        student, teacher = method.build_models(argparse.Namespace(), teacher_tf, student_tf)
        teacher.requires_grad_(False).eval()
        in_memory = count_parameters(student)["total"] + count_parameters(teacher)["total"]
    else:
        base = make()
        student, teacher = build_tied_models(argparse.Namespace(), method, base, LoraSpec(rank=rank), torch.float32)
        in_memory = count_parameters(student)["total"]
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    start = None
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()  # the first step allocates the optimizer state
        inp = type(inputs)(**vars(inputs))
        out = method.loss(student, student, teacher, latents, inp, step)
        optimizer.zero_grad(set_to_none=False)
        out.loss.backward()
        optimizer.step()
    seconds = (time.perf_counter() - start) / steps
    state_elems = sum(t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim)
    trainable = sum(p.numel() for p in params)
    exact = 4 * (in_memory + trainable + state_elems)  # fp32 weights, gradients of trainable, AdamW states
    return {"method": method_name, "student": "full" if rank == 0 else f"lora r{rank}", "params_in_memory": in_memory,
            "trainable": trainable, "optimizer_state_elements": state_elems, "weights_grads_optimizer_bytes": exact,
            "peak_extra_rss_bytes": max(0, _rss() - base_rss), "seconds_per_step": seconds,
            "loss": float(out.loss)}


def count_8b(ranks: list[int]) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from model.lora import LoraSpec, lora_parameter_count
    from training.memory_plan import count_parameters

    full = count_parameters(LITE_8B)
    rows = [{"student": "full", "params_in_memory": 2 * full, "trainable": full, "optimizer_state_elements": 2 * full}]
    for rank in ranks:
        counts = lora_parameter_count(LITE_8B, LoraSpec(rank=rank))
        rows.append({"student": f"lora r{rank}", "params_in_memory": counts["total"], "trainable": counts["trainable"],
                     "optimizer_state_elements": 2 * counts["trainable"]})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["scm", "meanflow"], choices=["scm", "meanflow"])
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64], help="LoRA ranks to compare with the full student.")
    p.add_argument("--steps", type=int, default=3, help="Timed optimizer steps (after one warm-up step).")
    p.add_argument("--batch", type=int, default=2, help="Micro-batch.")
    p.add_argument("--side", type=int, default=16, help="Latent side in packed tokens (16 -> 256 image tokens).")
    p.add_argument("--count_only", choices=["8b"], default=None, help="Only count parameters of the 8B architecture.")
    p.add_argument("--json", default=None, help="Write the rows here.")
    p.add_argument("--_child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(_measure(args._child[0], int(args._child[1]), args.steps, args.batch, args.side)))
        return
    if args.count_only:
        rows = count_8b(args.ranks)
        for r in rows:
            print(f"{r['student']:>10}  in memory {r['params_in_memory'] / 1e9:7.3f} B  trainable "
                  f"{r['trainable'] / 1e6:9.2f} M  AdamW states {r['optimizer_state_elements'] / 1e6:9.2f} M")
    else:
        rows = []
        for method in args.methods:
            for rank in [0, *args.ranks]:
                cmd = [sys.executable, __file__, "--_child", method, str(rank), "--steps", str(args.steps),
                       "--batch", str(args.batch), "--side", str(args.side)]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{row['method']:>8} {row['student']:>9}: in memory {row['params_in_memory'] / 1e6:6.2f} M, "
                      f"trainable {row['trainable'] / 1e6:6.3f} M, AdamW states {row['optimizer_state_elements'] / 1e6:6.3f} M, "
                      f"weights+grads+states {row['weights_grads_optimizer_bytes'] / 2**20:7.1f} MiB, peak extra RSS "
                      f"{row['peak_extra_rss_bytes'] / 2**20:7.1f} MiB, {row['seconds_per_step']:.2f} s/step", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
