"""Per-GPU memory plan of a distillation run, before launching it.

    python -m training.memory_plan                                   # FLUX.1-lite-8B, 8 × 80 GB, ZeRO-2, 512² and 1024²
    python -m training.memory_plan --resolution 1024 --batch 2 --gradient_checkpointing --conditioning_cache
    python -m training.memory_plan --transformer_config PIPE/transformer/config.json --zero_stage 0 --precision fp32

Terms (Ψ_s student parameters, Ψ_train trainable ones — all of them, or a LoRA's —, Ψ_t teacher
parameters, G GPUs, w bytes per weight: 2 in bf16, 4 in fp32):

* student weights        w·Ψ_s (every ZeRO stage ≤ 2 keeps the full bf16 copy on every GPU);
* gradients              w·Ψ_train, ÷ G with ZeRO-2 (gradient partitions);
* optimizer              Adam m and v (8·Ψ_train) plus an fp32 master copy (4·Ψ_train) when w = 2,
                         ÷ G with ZeRO-1/2 — the ZeRO paper's K = 12 bytes per parameter;
* DeepSpeed buckets      (reduce_bucket_size + allgather_bucket_size)·w (parallel_config/: 5e8 + 2e8);
* teacher                w·Ψ_t, frozen, not sharded (0 when it shares the student's base weights, e.g. LoRA);
* text encoders + VAE    T5-XXL and CLIP-L in w, the VAE in fp32 — 0 with ``--conditioning_cache``;
* activations            what autograd keeps for the backward of one student forward on the micro-batch;
                         with ``--gradient_checkpointing`` only each block's inputs plus one block's
                         activations during its recomputation;
* JVP pass               the live primal + tangent working set of the no-grad JVP (one block at a time),
                         plus the chunked attention's score chunks, 3·B·H·min(1024, S)·S fp32 (0 with the
                         flash-JVP kernel); the JVP runs before the gradient pass, so the peak is the larger
                         of the two — except MeanFlow with CFG, whose gradient pass runs first (its value is
                         u_c), so there the JVP's working set adds to the kept activations.

Activation and JVP bytes are *measured*, not guessed: the same FLUX classes are run on CPU at the
target head dimension with 2 heads, one block of each kind and a few tokens, counting the bytes of
tensors saved for backward (``torch.autograd.graph.saved_tensors_hooks``) and of live tensors during
the JVP (a ``TorchDispatchMode``), then scaled by B·S·d (FLUX's blocks are linear in tokens × width once
attention is fused).  ``benchmarks/train_step.py`` measures real peaks to check this plan against.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GIB = 2 ** 30
# FLUX.1-lite-8B (Freepik): diffusers' FluxTransformer2DModel with 8 double-stream and 38 single-stream
# blocks (FLUX.1-dev has 19 + 38), 24 heads × 128, T5 4096-d tokens, CLIP-L pooled 768, guidance embedding.
FLUX_LITE_8B = dict(patch_size=1, in_channels=64, num_layers=8, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                    axes_dims_rope=(16, 56, 56))
# Parameter counts of FLUX's text encoders and VAE (T5-XXL encoder, CLIP-L text model, FLUX VAE).
T5_XXL_PARAMS = 4_762_310_656
CLIP_L_PARAMS = 123_060_480
FLUX_VAE_PARAMS = 83_819_683
JVP_CHUNK = 1024  # query chunk of the chunked JVP attention on CUDA (model/attention.py default_tangent_chunk)
METHODS = ("sCM", "MeanFlow", "MeanFlow+CFG", "rescale")


@dataclass
class RunShape:
    """What the plan needs to know about a run (one micro-batch per GPU)."""

    transformer: dict = field(default_factory=lambda: dict(FLUX_LITE_8B))
    resolution: int = 512
    batch: int = 1
    num_gpus: int = 8
    zero_stage: int = 2  # 0 = plain DDP
    precision: str = "bf16"  # weights/activations: bf16 (DeepSpeed) or fp32
    method: str = "sCM"
    gradient_checkpointing: bool = False
    conditioning_cache: bool = False  # no text encoders / VAE on the training GPUs
    max_sequence_length: int = 256  # T5 tokens
    trainable_params: int | None = None  # None: every student parameter (LoRA: its adapter parameters)
    teacher_shares_weights: bool = False  # the teacher is the student's frozen base (LoRA)
    jvp_kernel: str = "chunked"  # chunked (score chunks in memory) or flash (O(N))
    bucket_elements: float = 7e8  # DeepSpeed reduce_bucket_size + allgather_bucket_size

    @property
    def weight_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def image_tokens(self) -> int:
        side = self.resolution // 16  # VAE /8, then 2×2 patches
        return side * side

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.max_sequence_length

    @property
    def width(self) -> int:
        return self.transformer["num_attention_heads"] * self.transformer["attention_head_dim"]

    def validate(self) -> None:
        if self.resolution <= 0 or self.resolution % 16:
            raise ValueError(f"--resolution {self.resolution} must be a positive multiple of 16")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"--zero_stage {self.zero_stage}: ZeRO-3 cannot run a JVP (its hooks have no forward-mode "
                             "derivative); use 0 (DDP), 1 or 2")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"--precision {self.precision!r} must be bf16 or fp32")
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.batch < 1 or self.num_gpus < 1:
            raise ValueError("--batch and --num_gpus must be >= 1")


def count_parameters(config: dict, interval_embedding: bool = False) -> int:
    """Exact parameter count of the FLUX transformer, built on the meta device (no memory)."""
    from model.transformer import DistillFluxTransformer2DModel

    with torch.device("meta"):
        model = DistillFluxTransformer2DModel(**config, interval_embedding=interval_embedding)
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------ measured per token
def _storage_key(t: torch.Tensor):
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return id(t), t.numel() * t.element_size()


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensors created by ops while active and still alive (storage-deduplicated)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and not t._is_view():
                ptr, nbytes = _storage_key(t)
                if ptr not in self.live and nbytes:
                    self.live[ptr] = nbytes
                    self.current += nbytes
                    weakref.finalize(t.untyped_storage(), self._release, ptr)
        self.peak = max(self.peak, self.current)
        return out


@dataclass
class TracedBytes:
    """Bytes measured on the probe model: per token·width unit (B·S·d) plus a width²-scaled constant."""

    saved_per_unit: dict[str, float]  # saved for backward: "double", "single" (per block), "outer"
    block_inputs_per_unit: dict[str, float]  # what checkpointing keeps per block (its input tensors)
    jvp_live_per_unit: float  # JVP working set, the attention score chunks excluded
    jvp_live_constant: float = 0.0  # the part that does not grow with tokens (weight-sized temporaries)
    probe_width: int = 256

    def jvp_live(self, units: float, width: int) -> float:
        return units * self.jvp_live_per_unit + self.jvp_live_constant * (width / self.probe_width) ** 2


def _probe_config(shape: RunShape) -> dict:
    return {**shape.transformer, "num_attention_heads": 2, "num_layers": 1, "num_single_layers": 1}


def trace_bytes(shape: RunShape) -> TracedBytes:
    """Probe at two token counts; per-unit bytes are the slope (module doc), the rest a width² constant."""
    (u1, a), (u2, b) = _probe(shape, 8), _probe(shape, 16)
    slope = lambda x, y: (y - x) / (u2 - u1)  # noqa: E731
    jvp_slope = slope(a.jvp_live_per_unit * u1, b.jvp_live_per_unit * u2)
    return TracedBytes({k: slope(a.saved_per_unit[k] * u1, b.saved_per_unit[k] * u2) for k in a.saved_per_unit},
                       {k: slope(a.block_inputs_per_unit[k] * u1, b.block_inputs_per_unit[k] * u2)
                        for k in a.block_inputs_per_unit},
                       jvp_slope, max(a.jvp_live_per_unit * u1 - jvp_slope * u1, 0.0), a.probe_width)


def _probe(shape: RunShape, image_side: int, text_tokens: int = 16) -> tuple[int, TracedBytes]:
    """(units B·S·d, bytes per unit) of one probe run with grad and one through a JVP."""
    from model.attention import default_tangent_chunk, set_jvp_attention
    from model.transformer import DistillFluxTransformer2DModel
    from model.trigflow import FluxInputs, flow_velocity

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the probe is cast with .to(dtype) on purpose
    dtype = torch.bfloat16 if shape.precision == "bf16" else torch.float32
    config = _probe_config(shape)
    torch.manual_seed(0)
    model = DistillFluxTransformer2DModel(**config, timestep_scale=1.0,
                                          interval_embedding=shape.method.startswith("MeanFlow")).to(dtype)
    set_jvp_attention(model, "chunked")
    b, n, l = 1, image_side * image_side, text_tokens
    d = 2 * config["attention_head_dim"]
    unit = b * (n + l) * d
    ids = torch.zeros(image_side, image_side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(image_side)[:, None], torch.arange(image_side)[None, :]
    inputs = FluxInputs(torch.randn(b, l, config["joint_attention_dim"], dtype=dtype),
                        torch.randn(b, config["pooled_projection_dim"], dtype=dtype), torch.zeros(l, 3),
                        ids.reshape(-1, 3), torch.full((b,), 4.5) if config.get("guidance_embeds") else None)
    x = torch.randn(b, n, config["in_channels"], dtype=dtype)
    t = torch.full((b,), 0.5)
    extra = {"interval": torch.full((b,), 0.25)} if shape.method.startswith("MeanFlow") else {}
    fwd = lambda z, tt: model(z.to(dtype), timestep=tt, **inputs.kwargs(dtype), **extra)[0]  # noqa: E731

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[str, dict] = {"double": {}, "single": {}, "outer": {}}
    inputs_kept: dict[str, dict] = {"double": {}, "single": {}}
    where = ["outer"]

    def pack(tensor):
        key = _storage_key(tensor)
        if key[0] not in params:
            saved[where[0]][key[0]] = key[1]
        return tensor

    def enter(kind):
        def hook(module, args, kwargs):
            where[0] = kind
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, torch.Tensor) and a.dim() == 3:  # hidden / encoder hidden states
                    k = _storage_key(a)
                    inputs_kept[kind][k[0]] = k[1]
        return hook

    leave = lambda module, args, output: where.__setitem__(0, "outer")  # noqa: E731
    handles = []
    for kind, blocks in (("double", model.transformer_blocks), ("single", model.single_transformer_blocks)):
        for block in blocks:
            handles += [block.register_forward_pre_hook(enter(kind), with_kwargs=True),
                        block.register_forward_hook(leave)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fwd(x, t)
    del out
    for h in handles:
        h.remove()

    model.requires_grad_(False)
    tracker = LiveTensorBytes()
    with torch.no_grad(), tracker:
        primal, tangent = torch.func.jvp(fwd, (x, t), (torch.randn_like(x), torch.ones_like(t)))
    del primal, tangent
    s = n + l
    probe_scores = 3 * b * 2 * s * min(default_tangent_chunk(x.device), s) * 4  # the probe's own chunk (CPU)
    return unit, TracedBytes({k: sum(v.values()) / unit for k, v in saved.items()},
                             {k: sum(v.values()) / unit for k, v in inputs_kept.items()},
                             max(tracker.peak - probe_scores, 0) / unit, probe_width=d)


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    shape: RunShape
    rows: dict[str, float]  # term → bytes per GPU
    peak_phase: str

    @property
    def total(self) -> float:
        return sum(v for k, v in self.rows.items() if not k.startswith("(")) + 0.0

    def fits(self, gpu_gib: float, reserve_gib: float = 1.5) -> bool:
        """Fits when total + a reserve for the CUDA context and allocator fragmentation ≤ the GPU size."""
        return self.total + reserve_gib * GIB <= gpu_gib * GIB


def plan_memory(shape: RunShape, traced: TracedBytes | None = None) -> MemoryPlan:
    shape.validate()
    traced = traced or trace_bytes(shape)
    c, w, g = shape.transformer, shape.weight_bytes, shape.num_gpus
    interval = shape.method.startswith("MeanFlow")
    psi_s = count_parameters(c, interval_embedding=interval)
    if shape.method == "sCM":
        psi_s += c["num_attention_heads"] * c["attention_head_dim"] + 1  # the logvar head
    psi_train = psi_s if shape.trainable_params is None else shape.trainable_params
    psi_t = 0 if shape.teacher_shares_weights else count_parameters(c)
    shard_grads = g if shape.zero_stage >= 2 else 1
    shard_optim = g if shape.zero_stage >= 1 else 1
    master = 4 if w == 2 else 0
    rows = {
        "student weights": w * psi_s,
        "gradients": w * psi_train / shard_grads,
        "optimizer (Adam m, v" + (", fp32 master)" if master else ")"): (8 + master) * psi_train / shard_optim,
        "DeepSpeed buckets": shape.bucket_elements * w if shape.zero_stage >= 1 else 0,
        "teacher weights": w * psi_t,
        "text encoders + VAE": 0 if shape.conditioning_cache else w * (T5_XXL_PARAMS + CLIP_L_PARAMS) + 4 * FLUX_VAE_PARAMS,
    }
    unit = shape.batch * shape.tokens * shape.width
    nd, ns = c["num_layers"], c["num_single_layers"]
    saved = traced.saved_per_unit
    full = unit * (nd * saved["double"] + ns * saved["single"] + saved["outer"])
    if shape.gradient_checkpointing:
        kept = traced.block_inputs_per_unit
        activations = unit * (nd * kept["double"] + ns * kept["single"] + saved["outer"]
                              + max(saved["double"], saved["single"]))
    else:
        activations = full
    scores = 0 if shape.jvp_kernel == "flash" else (
        3 * shape.batch * c["num_attention_heads"] * shape.tokens * min(JVP_CHUNK, shape.tokens) * 4)
    jvp = 0.0 if shape.method == "rescale" else traced.jvp_live(unit, shape.width) + scores
    rows["(activations, gradient pass)"] = activations
    rows["(JVP pass, no grad)"] = jvp
    if shape.method == "MeanFlow+CFG":  # its gradient pass runs first (training/meanflow.py): the graph is alive
        peak_extra, phase = activations + jvp, "JVP pass on top of the gradient graph"
    else:
        peak_extra, phase = (activations, "gradient pass") if activations >= jvp else (jvp, "JVP pass")
    rows["peak working set"] = peak_extra
    return MemoryPlan(shape, rows, phase)


def format_plan(plans: list[MemoryPlan], gpu_gib: float) -> str:
    """Markdown table: one column per plan."""
    heads = [f"{p.shape.resolution}² × {p.shape.batch}" + (" ckpt" if p.shape.gradient_checkpointing else "")
             for p in plans]
    lines = ["| GiB per GPU | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(plans)]
    for key in plans[0].rows:
        lines.append(f"| {key} | " + " | ".join(f"{p.rows[key] / GIB:.1f}" for p in plans) + " |")
    lines.append("| **total** | " + " | ".join(f"**{p.total / GIB:.1f}**" for p in plans) + " |")
    lines.append(f"| fits {gpu_gib:g} GiB (1.5 GiB reserve) | " +
                 " | ".join("yes" if p.fits(gpu_gib) else "**no**" for p in plans) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--transformer_config", default=None,
                   help="A FLUX transformer config.json (e.g. PIPE/transformer/config.json). Default: FLUX.1-lite-8B "
                        "(8 double + 38 single blocks, 24 heads x 128).")
    p.add_argument("--resolution", type=int, nargs="+", default=[512, 1024], help="Training resolution(s), pixels.")
    p.add_argument("--batch", type=int, default=1, help="Micro-batch per GPU (--train_batch_size).")
    p.add_argument("--num_gpus", type=int, default=8, help="GPUs (data-parallel ranks).")
    p.add_argument("--zero_stage", type=int, default=2, help="DeepSpeed ZeRO stage; 0 = plain DDP.")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="Weights and activations.")
    p.add_argument("--method", choices=METHODS, default="sCM", help="Distillation method.")
    p.add_argument("--gradient_checkpointing", action="store_true", help="Plan with --gradient_checkpointing.")
    p.add_argument("--both_checkpointing", action="store_true",
                   help="One column with and one without gradient checkpointing per resolution.")
    p.add_argument("--conditioning_cache", action="store_true",
                   help="Train from precomputed embeddings/latents: no text encoders or VAE on the GPUs.")
    p.add_argument("--max_sequence_length", type=int, default=256, help="T5 tokens per prompt.")
    p.add_argument("--trainable_params", type=int, default=None,
                   help="Trainable parameter count (default: every student parameter; a LoRA passes its own).")
    p.add_argument("--teacher_shares_weights", action="store_true",
                   help="The teacher is the student's frozen base (LoRA): no second copy of the weights.")
    p.add_argument("--lora_rank", type=int, default=0,
                   help="Plan a LoRA student of this rank (training/lora.py): trainable = its adapter + the method's "
                        "new heads, and the teacher shares the base (overrides the two flags above). 0 = full student.")
    p.add_argument("--lora_target_modules", default=None,
                   help="With --lora_rank: the adapted layers, as for the trainers (default: theirs).")
    p.add_argument("--jvp_kernel", choices=["chunked", "flash"], default="chunked",
                   help="JVP attention: chunked (score chunks in memory) or the flash-JVP kernel (O(N)).")
    p.add_argument("--gpu_memory_gib", type=float, default=80.0, help="Memory of one GPU, GiB.")
    p.add_argument("--json", default=None, help="Also write the plan as JSON here.")
    args = p.parse_args(argv)
    if args.transformer_config and not Path(args.transformer_config).is_file():
        p.error(f"--transformer_config {args.transformer_config} is not a file (a transformer config.json)")
    return args


def _transformer_config(path: str | None) -> dict:
    if path is None:
        return dict(FLUX_LITE_8B)
    raw = json.loads(Path(path).read_text())
    keys = set(FLUX_LITE_8B) | {"out_channels"}
    return {k: v for k, v in raw.items() if k in keys}


def lora_trainable_params(transformer: dict, method: str, rank: int, target_modules: str | None = None) -> int:
    """Trainable parameters of a LoRA student: the adapter, plus MeanFlow's interval embedder or sCM's logvar head."""
    from model.lora import DEFAULT_TARGET_MODULES, LoraSpec, lora_parameter_count

    targets = tuple(t.strip() for t in (target_modules or ",".join(DEFAULT_TARGET_MODULES)).split(",") if t.strip())
    counts = lora_parameter_count(transformer, LoraSpec(rank=rank, target_modules=targets),
                                  interval_embedding=method.startswith("MeanFlow"))
    width = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    return counts["trainable"] + (width + 1 if method == "sCM" else 0)  # logvar_linear: width → 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    transformer = _transformer_config(args.transformer_config)
    if args.lora_rank:
        try:
            args.trainable_params = lora_trainable_params(transformer, args.method, args.lora_rank,
                                                          args.lora_target_modules)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        args.teacher_shares_weights = True
    base = RunShape(transformer, args.resolution[0], args.batch, args.num_gpus, args.zero_stage, args.precision,
                    args.method, args.gradient_checkpointing, args.conditioning_cache, args.max_sequence_length,
                    args.trainable_params, args.teacher_shares_weights, args.jvp_kernel)
    try:
        base.validate()
        traced = trace_bytes(base)
        shapes = []
        for res in args.resolution:
            for ckpt in ((False, True) if args.both_checkpointing else (args.gradient_checkpointing,)):
                shapes.append(replace(base, resolution=res, gradient_checkpointing=ckpt))
        plans = [plan_memory(s, traced) for s in shapes]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    psi = count_parameters(transformer)
    print(f"{args.method}, transformer {psi / 1e9:.2f} B parameters, {args.num_gpus} GPUs, ZeRO-{args.zero_stage}, "
          f"{args.precision}, micro-batch {args.batch}, {args.max_sequence_length} text tokens, "
          f"{'conditioning cache' if args.conditioning_cache else 'text encoders + VAE on every GPU'}")
    print(format_plan(plans, args.gpu_memory_gib))
    print("Rows in parentheses are the two phases; 'peak working set' (the larger) is what the total counts.")
    if args.json:
        Path(args.json).write_text(json.dumps([{"shape": {k: v for k, v in vars(p.shape).items()},
                                                "rows_bytes": p.rows, "total_bytes": p.total,
                                                "fits": p.fits(args.gpu_memory_gib)} for p in plans], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
