"""LoRA distillation on the shared core (``--lora_rank`` > 0): how the student and teacher are built, what the
optimizer gets, and what checkpoints and exports hold.  The model side is ``model/lora.py``.

* One transformer is loaded (the base: stock FLUX, or the rescaled teacher with ``--rescaled_checkpoint_path``).
  The method wraps it twice (``build_models(args, base, base)``); the student gets the adapter, the teacher
  is :class:`~model.lora.TiedTeacher`: the same weights with adapters off, no interval embedding and the
  base's own ``timestep_scale`` (1000 for teacher rescaling, whose student runs at ×1).
* Trainable: LoRA A/B and the method's new heads (sCM ``logvar_linear``, MeanFlow interval embedder), in
  float32; the frozen base is cast to the training precision (bf16 with ``--mixed_precision bf16`` or
  DeepSpeed), as the separate teacher was.  The optimizer only sees the trainable tensors.
* Checkpoints (``checkpoints/checkpoint-N``) keep only the trainable tensors of the model (plus optimizer,
  scheduler, RNG, train state); the base is rebuilt from the run's (invariant) model flags on resume.
* Exports: ``ckpts/lora_<step>/`` (diffusers LoRA + heads + lora_info.json, see model/lora.py; with
  ``--use_ema`` also ``ckpts/lora_<step>_ema/`` holding the averaged adapter and heads) for sCM and MeanFlow; teacher rescaling exports the fused ×1 weights as ``ckpts/transformer_<step>.pt`` as usual,
  since the distillation runs need a full rescaled teacher.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from model.lora import (DEFAULT_TARGET_MODULES, TiedTeacher, LoraSpec, add_student_adapter, count_parameters,
                        fused_state_dict, head_parameters, save_lora_folder)

logger = logging.getLogger("t2i_distill")

#: Flags that change what a LoRA checkpoint's tensors mean: a resume must keep them.
LORA_RESUME_INVARIANTS = ("lora_rank", "lora_alpha", "lora_target_modules", "lora_dropout")
LORA_EXPORT_RE = re.compile(r"^lora_(\d+)$")


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LoRA student (one copy of the weights: the teacher is the base, adapters off)")
    g.add_argument("--lora_rank", type=int, default=0,
                   help="Rank r of the LoRA adapters; 0 = train the full student (the original's way).")
    g.add_argument("--lora_alpha", type=float, default=None,
                   help="LoRA alpha; the update is (alpha/r)·B·A. Default: alpha = r (scale 1).")
    g.add_argument("--lora_target_modules", default=",".join(DEFAULT_TARGET_MODULES),
                   help="Comma-separated name suffixes of the Linear layers inside the transformer blocks to adapt, "
                        "or 'all'. The default covers every attention projection and MLP of both block types.")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA branch input.")


def lora_spec(args: argparse.Namespace) -> LoraSpec | None:
    """The run's LoRA settings (None for a full student); raises LoraError (a ValueError) for bad values."""
    if getattr(args, "lora_rank", 0) in (0, None):
        return None
    targets = tuple(t.strip() for t in args.lora_target_modules.split(",") if t.strip())
    return LoraSpec(rank=args.lora_rank, alpha=args.lora_alpha, target_modules=targets, dropout=args.lora_dropout)


def validate_lora_args(args: argparse.Namespace) -> None:
    rank = getattr(args, "lora_rank", 0) or 0
    if rank < 0:
        raise ValueError(f"--lora_rank {args.lora_rank} must be >= 0 (0 = full student)")
    if rank == 0 and (args.lora_alpha is not None or args.lora_dropout):
        raise ValueError("--lora_alpha/--lora_dropout only apply to a LoRA student: add --lora_rank R")
    lora_spec(args)


def build_tied_models(args: argparse.Namespace, method, base: nn.Module, spec: LoraSpec,
                      frozen_dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """(student, teacher) sharing ``base``; see the module doc.  ``frozen_dtype``: the frozen weights' dtype."""
    teacher_scale = base.timestep_scale  # before the method may switch the student's (rescale → ×1)
    student, teacher = method.build_models(args, base, base)
    targets = add_student_adapter(base, spec)
    if not isinstance(teacher, nn.Identity):  # rescale/flow_matching never calls its teacher
        teacher = TiedTeacher(teacher, base, teacher_scale)
    for p in student.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # AdamW states and updates in float32
        else:
            p.data = p.data.to(frozen_dtype)
    counts = count_parameters(student)
    logger.info("LoRA r=%d alpha=%g on %d layers: %d of %d parameters trainable (%.2f%%), heads: %s", spec.rank,
                spec.lora_alpha, len(targets), counts["trainable"], counts["total"],
                100 * counts["trainable"] / counts["total"], trainable_heads(student) or "none")
    return student, teacher


def trainable_heads(student: nn.Module) -> list[str]:
    """Names of the trainable tensors that are not LoRA weights (the fully trained heads)."""
    return [name for name, p in student.named_parameters() if p.requires_grad and ".lora_" not in name]


def transformer_of(student: nn.Module) -> nn.Module:
    """The FLUX transformer inside a method's student wrapper (or the student itself)."""
    return getattr(student, "transformer", student)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: only the trainable tensors
# ---------------------------------------------------------------------------------------------------------

def register_trainable_only_checkpoints(accelerator, student: nn.Module) -> None:
    """Make ``accelerator.save_state``/``load_state`` write and read only the student's trainable tensors.

    Without DeepSpeed, accelerate passes the model state dicts to the hooks before writing/reading them;
    the save hook drops the frozen base, the load hook loads the trainable tensors itself (strictly: the
    file must hold exactly them) and removes the model from accelerate's list.  With DeepSpeed the engine
    saves and loads its own files: see :func:`deepspeed_state_kwargs`.
    """
    from safetensors.torch import load_file

    def trainable_names(model: nn.Module) -> set[str]:
        return {name for name, p in model.named_parameters() if p.requires_grad}

    def save_hook(models, weights, output_dir):
        for model, state in zip(models, weights):
            if accelerator.unwrap_model(model) is accelerator.unwrap_model(student):
                keep = trainable_names(model)
                for key in [k for k in state if k not in keep]:
                    del state[key]

    def load_hook(models, input_dir):
        for i, model in enumerate(list(models)):
            if accelerator.unwrap_model(model) is not accelerator.unwrap_model(student):
                continue
            path = Path(input_dir, "model.safetensors" if i == 0 else f"model_{i}.safetensors")
            state = load_file(path)
            expected = trainable_names(model)
            if set(state) != expected:
                missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
                raise ValueError(f"{path} does not hold this run's LoRA/head tensors (missing {missing[:3]}, "
                                 f"unexpected {extra[:3]}): was it written with the same --lora_* flags?")
            params = dict(model.named_parameters())
            with torch.no_grad():
                for key, value in state.items():
                    params[key].copy_(value)
            models.remove(model)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def attach_lora(run) -> None:
    """Checkpoint only the trainable tensors and export the LoRA folder (``run`` is a training.core.Run)."""
    if run.deepspeed:
        run.save_state_kwargs, run.load_state_kwargs = deepspeed_state_kwargs()
    else:
        register_trainable_only_checkpoints(run.accelerator, run.student)

    def export(run, step: int, suffix: str = "") -> None:
        """The step's export of the student's current weights (the EMA hook calls it with them swapped in)."""
        export_lora_student(run.args.output_dir, run.method, run.unwrapped, run.args, step, suffix)
        if suffix:
            return  # pruned together with the raw export
        if getattr(run.method, "lora_export", "adapter") == "fused":
            from training import checkpointing as ckpt

            ckpt.prune_exports(run.args.output_dir, getattr(run.args, "exports_total_limit", None))
        else:
            prune_lora_exports(run.args.output_dir, getattr(run.args, "exports_total_limit", None))

    run.export = export


def deepspeed_state_kwargs() -> tuple[dict, dict]:
    """(save_state kwargs, load_state kwargs) for a DeepSpeed engine whose base is frozen."""
    return {"exclude_frozen_parameters": True}, {"load_module_strict": False}


# ---------------------------------------------------------------------------------------------------------
# Exports
# ---------------------------------------------------------------------------------------------------------

def lora_export_path(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / "ckpts" / f"lora_{step}"


def export_lora_student(output_dir: str | os.PathLike, method, student: nn.Module, args: argparse.Namespace,
                        step: int, suffix: str = "") -> Path:
    """Write the step's export: the LoRA folder ``ckpts/lora_<step><suffix>/``, or (teacher rescaling) the fused
    ``ckpts/transformer_<step><suffix>.pt``."""
    from training import checkpointing as ckpt

    transformer = transformer_of(student)
    if getattr(method, "lora_export", "adapter") == "fused":
        path = ckpt.export_path(output_dir, step)
        path = path.with_name(f"{path.stem}{suffix}{path.suffix}")
        ckpt.export_transformer(path, fused_state_dict(transformer), dict(transformer.config), step)
        return path
    heads = dict(head_parameters(transformer))
    logvar = getattr(student, "logvar_linear", None)
    if logvar is not None:
        heads.update({f"logvar_linear.{k}": v for k, v in logvar.state_dict().items()})
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    info = {"method": method.name, "step": step, "transformer_config": config,
            "pretrained_model_name_or_path": _maybe_abs(args.pretrained_model_name_or_path),
            "rescaled_checkpoint_path": _maybe_abs(args.rescaled_checkpoint_path),
            "lora": {"rank": args.lora_rank, "alpha": lora_spec(args).lora_alpha,
                     "target_modules": args.lora_target_modules, "dropout": args.lora_dropout}}
    folder = lora_export_path(output_dir, step)
    return save_lora_folder(folder.with_name(folder.name + suffix), transformer, heads, info)


def prune_lora_exports(output_dir: str | os.PathLike, keep: int | None) -> None:
    """Remove all but the newest ``keep`` ``ckpts/lora_<step>/`` folders (None: keep all)."""
    if not keep or keep < 1:
        return
    root = Path(output_dir) / "ckpts"
    found = sorted((int(m.group(1)), p) for p in root.glob("lora_*") if (m := LORA_EXPORT_RE.match(p.name)))
    for _, old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(old.with_name(old.name + "_ema"), ignore_errors=True)


def _maybe_abs(path: str | None) -> str | None:
    return os.path.abspath(path) if path and os.path.exists(path) else path
