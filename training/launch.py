"""Set-up pieces of a run, each checked before anything is written: accelerator, resume point, models.

Called in this order by :func:`training.core.train`; each fails with a one-line user error.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration
from torch import nn

from model.flux_io import FluxConditioner, check_resolution, load_flux_components
from model.loading import load_flux_transformer, load_transformer_weights
from training import checkpointing as ckpt
from training.common import TrainingError
from training.lora import build_tied_models, lora_spec

logger = logging.getLogger("t2i_distill")


def _deepspeed_plugin(args: argparse.Namespace) -> DeepSpeedPlugin | None:
    if args.ds_file is None:
        return None
    config = json.loads(Path(args.ds_file).read_text())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # The flags are the source of truth; the original's "auto" clipping silently became 1.0.
    config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    config["train_batch_size"] = args.train_batch_size * args.gradient_accumulation_steps * world
    config["gradient_clipping"] = args.max_grad_norm
    if config.get("bf16", {}).get("enabled"):
        # Non-finite steps are skipped by DeepSpeed's overflow check (training/core.py): make sure it is on.
        config["bf16"]["check_grad_overflow"] = True
    elif not config.get("fp16", {}).get("enabled"):
        raise ValueError(f"--ds_file {args.ds_file} enables neither bf16 nor fp16: fp32 ZeRO has no overflow check, "
                         "so a non-finite step could not be skipped. Enable bf16 (see parallel_config/).")
    return DeepSpeedPlugin(hf_ds_config=config)


_LAUNCH_FIX = ("launch with bash script/train_<method>.sh (NPROC_PER_NODE=N), or torchrun --nproc_per_node N "
               "(with ACCELERATE_USE_CPU=true on CPU), or accelerate launch --multi_gpu --num_processes N on GPUs")


def check_launch_environment(args: argparse.Namespace, env: dict | None = None) -> None:
    """Refuse process layouts that would fail deep inside accelerate/DeepSpeed, or silently run wrong.

    * WORLD_SIZE without RANK/LOCAL_RANK/MASTER_ADDR/MASTER_PORT: no launcher started this process
      (a stale WORLD_SIZE in the shell); init_process_group would fail or wait.
    * ``--ds_file`` without a launcher: DeepSpeed needs a process group ("Default process group has
      not been initialized").
    * ``accelerate launch --num_processes N`` without ``--multi_gpu``: accelerate's simple launcher
      starts one process (it only sets MASTER_ADDR), so the N requested processes never exist.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise TrainingError(f"WORLD_SIZE={env['WORLD_SIZE']} is set but {'/'.join(missing)} are not: no launcher "
                                "started this process (a stale WORLD_SIZE in the shell?). Run `unset WORLD_SIZE` for "
                                f"one process, or {_LAUNCH_FIX}.")
        return
    if args.ds_file is not None:
        raise TrainingError(f"--ds_file {args.ds_file} needs a distributed launcher (DeepSpeed runs in a process group "
                            f"even for one process): {_LAUNCH_FIX}; or omit --ds_file for a plain single process.")
    if "MASTER_ADDR" in env and any(k.startswith("ACCELERATE_") for k in env):
        raise TrainingError("accelerate launch asked for several processes but started only this one (--num_processes "
                            "without --multi_gpu runs a single process): add --multi_gpu on GPUs, or "
                            f"{_LAUNCH_FIX}.")


def check_process_layout(accelerator: Accelerator) -> None:
    """More than one process must mean a synchronised run: distributed type NO would train N independent copies."""
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise TrainingError(f"{accelerator.num_processes} processes run with accelerate's distributed type NO, so "
                            f"they would train {accelerator.num_processes} unsynchronised copies (on CPU, accelerate "
                            f"launch --multi_gpu does this): {_LAUNCH_FIX}.")


def build_accelerator(args: argparse.Namespace) -> Accelerator:
    check_launch_environment(args)
    plugin = _deepspeed_plugin(args)
    mixed = args.mixed_precision
    if plugin is not None:
        ds_conf = plugin.deepspeed_config
        mixed = "bf16" if ds_conf.get("bf16", {}).get("enabled") else "fp16" if ds_conf.get("fp16", {}).get("enabled") else "no"
    report_to = None if args.report_to in (None, "none") else args.report_to
    kwargs = []
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or plugin is not None
    if distributed and not torch.cuda.is_available():
        # Without CUDA accelerate picks no backend and under-reports the world size; gloo fixes it.
        kwargs.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=mixed,
        log_with=report_to, deepspeed_plugin=plugin, kwargs_handlers=kwargs,
        # We step the LR scheduler once per applied update ourselves.  accelerate's default steps it
        # num_processes times per update, so a 2-process linear schedule would decay twice as fast.
        step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")),
    )
    if plugin is not None and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise TrainingError(f"--ds_file was given but accelerate runs as {accelerator.distributed_type.value}, not "
                            "DeepSpeed (ACCELERATE_USE_CPU=true turns DeepSpeed off; on CPU set DS_ACCELERATOR=cpu instead).")
    check_process_layout(accelerator)
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise TrainingError(f"accelerate sees {accelerator.num_processes} processes but WORLD_SIZE={expected}: the "
                           "launch is misconfigured (on CPU use torchrun with ACCELERATE_USE_CPU=true).")
    quiet_other_ranks(accelerator)
    logger.info("distributed type %s, %d process(es), mixed precision %s", accelerator.distributed_type.value,
                accelerator.num_processes, accelerator.mixed_precision)
    return accelerator


def quiet_other_ranks(accelerator: Accelerator) -> None:
    """Only the main process speaks: the others keep our warnings and errors but drop our info lines
    and the third-party libraries' warnings and progress bars, which would repeat the main process's
    once per rank."""
    if accelerator.is_main_process:
        return
    import datasets
    import diffusers
    import transformers

    logger.setLevel(logging.WARNING)
    for library in (transformers, diffusers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def check_output_dir_writable(output_dir: str) -> None:
    """Fail early, leaving nothing behind, when ``output_dir`` could not be created or written.

    The nearest existing ancestor must be a directory in which a file can really be created: a probe
    file is made and removed.  (``os.access`` is not enough: for root it reports read-only
    directories, and pseudo-filesystems such as /sys, as writable.)
    """
    path = Path(output_dir).absolute()
    while not path.exists() and not path.is_symlink():
        path = path.parent
    if not path.is_dir():
        raise PermissionError(f"--output_dir {output_dir} cannot be created: {path} is a file, not a folder. "
                              "Choose another --output_dir.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".t2i-write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"--output_dir {output_dir} is not writable: cannot create files in {path} "
                              f"({exc.strerror or exc}). Choose a writable folder.") from exc


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)


def run_config(args: argparse.Namespace, method, accelerator: Accelerator) -> dict:
    """The run's identity, saved with every checkpoint (run_config.json) and compared on resume."""
    return {**{k: v for k, v in vars(args).items() if not k.startswith("_")},
            "method": method.name, "num_processes": accelerator.num_processes,
            "distributed_type": accelerator.distributed_type.value}


def resume_point(args: argparse.Namespace, method, config: dict, accelerator: Accelerator) -> Path | None:
    """The checkpoint folder to continue from (None: a fresh run); refuses a different run's checkpoint."""
    if not args.resume_from_checkpoint:
        if ckpt.list_checkpoints(args.output_dir):
            raise ValueError(f"--output_dir {args.output_dir} already holds checkpoints of a run. Continue it with "
                             "--resume_from_checkpoint latest, or choose a new --output_dir.")
        return None
    path = ckpt.resolve_resume_path(args.output_dir, args.resume_from_checkpoint)
    if path is None:
        logger.info("no checkpoint in %s yet: starting from scratch", args.output_dir)
        return None
    changed = ckpt.check_resume_config(path, config, tuple(getattr(method, "resume_invariants", ())))
    if changed and accelerator.is_main_process:
        logger.warning("resuming with changed flags %s; the checkpoint's optimizer and LR-scheduler state "
                       "win over the new values where they overlap (e.g. --learning_rate)", changed)
    # accelerate silently skips a missing RNG file; a resumed run would then not be exact.
    rng = path / f"random_states_{accelerator.process_index}.pkl"
    if not rng.is_file():
        raise FileNotFoundError(f"{path} has no {rng.name}: it was not written by a run with "
                                f"{accelerator.num_processes} process(es) or is incomplete.")
    return path


def build_conditioner(args: argparse.Namespace, accelerator: Accelerator) -> FluxConditioner:
    """Frozen VAE + text encoders of the pipeline: (pixels, captions) → (latents, FluxInputs)."""
    # Text encoders in the training precision (T5-XXL is 19 GB in fp32); the VAE stays fp32 (84 M params).
    pipe = load_flux_components(args.pretrained_model_name_or_path, revision=args.revision,
                                dtype=weight_dtype(accelerator), vae_dtype=torch.float32)
    check_resolution(args.resolution, pipe.vae_scale_factor)
    return FluxConditioner(pipe, accelerator.device, args.max_sequence_length)


def load_base_transformer(args: argparse.Namespace) -> nn.Module:
    """One FLUX transformer with the rescaled weights when given: the run's only read of the weights."""
    transformer = load_flux_transformer(args.pretrained_model_name_or_path, args.timestep_scale, revision=args.revision)
    if args.rescaled_checkpoint_path:
        load_transformer_weights(transformer, args.rescaled_checkpoint_path)
    return transformer


def frozen_copy(source: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """An independent copy of ``source`` (attention processors, config and all) whose floating tensors are made
    directly in ``dtype`` on ``device``, with gradients off.

    A full-student run's teacher is this copy of the loaded student, made before the method changes the
    student: the same weights as loading the files a second time, without the second read of the 8B
    checkpoint, and without a float32 host copy of the teacher when it goes to a GPU in bf16 (each tensor
    is created on the device; ``copy.deepcopy`` takes them from the memo instead of duplicating ``source``'s).
    """
    memo: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain(source.parameters(), source.buffers()):
        copied = tensor.detach().to(device, dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
        memo[id(tensor)] = nn.Parameter(copied, requires_grad=False) if isinstance(tensor, nn.Parameter) else copied
    return copy.deepcopy(source, memo)


def build_models(args: argparse.Namespace, method, accelerator: Accelerator) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(trainable student, frozen teacher on the device, the student's inner FLUX transformer).

    The weights are read once.  With ``--lora_rank`` the two share that transformer (training/lora.py): no
    second copy.  Otherwise the teacher is a :func:`frozen_copy` of it in the training precision, or nothing
    for a method that never calls its teacher (``method.uses_teacher`` False: rescaling by flow matching).
    """
    spec = lora_spec(args)
    student_tf = load_base_transformer(args)
    if spec is not None:
        student, teacher = build_tied_models(args, method, student_tf, spec, weight_dtype(accelerator))
    else:
        teacher_tf = (frozen_copy(student_tf, accelerator.device, weight_dtype(accelerator))
                      if getattr(method, "uses_teacher", True) else None)
        student, teacher = method.build_models(args, teacher_tf, student_tf)
    teacher.requires_grad_(False).eval().to(accelerator.device, weight_dtype(accelerator))
    if args.gradient_checkpointing:
        student_tf.enable_gradient_checkpointing()
    student.train()
    return student, teacher, student_tf


def build_optimizer(args: argparse.Namespace, student: nn.Module):
    """AdamW over the trainable parameters and the flags' LR schedule (stepped once per applied update)."""
    from diffusers.optimization import get_scheduler

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                              num_training_steps=args.max_train_steps)
    return optimizer, scheduler
