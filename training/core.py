"""The one training loop shared by every method (sCM, MeanFlow, teacher rescaling).

A method supplies three things (:class:`DistillMethod`): how to wrap the loaded FLUX transformers
into a trainable student and a frozen teacher, its loss, and what to export.  Everything else lives
here once: accelerate/DeepSpeed set-up, data, optimisation, exact resume, atomic checkpoints,
preemption, bad-data and non-finite-step handling, logging.

Exact resume: the data order comes from :class:`ResumableSampler` (a permutation per epoch seeded by
``seed`` and the epoch, sharded by rank) whose position is part of the checkpointed train state; the
loss draws its noise from the global torch RNG of each rank, saved and restored by accelerate; the
DataLoader has its own generator so creating an iterator never consumes global random numbers.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from data.dataset import Text2ImageDataset, load_hf_dataset
from model.flux_io import FluxConditioner, check_resolution, load_flux_components
from model.loading import load_flux_transformer, load_transformer_weights
from model.trigflow import FluxInputs
from training import checkpointing as ckpt
from training.common import LossOutput, TrainingError

logger = logging.getLogger("t2i_distill")


class DistillMethod(Protocol):
    name: str

    def build_models(self, args: argparse.Namespace, teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(trainable student module, frozen teacher module) from two loaded FLUX transformers."""

    def loss(self, student: nn.Module, student_unwrapped: nn.Module, teacher: nn.Module,
             latents: torch.Tensor, inputs: FluxInputs, step: int) -> LossOutput:
        """The method's loss on one batch of packed latents."""

    def export_state_dict(self, student_unwrapped: nn.Module) -> tuple[dict, dict]:
        """(state dict in the original ``module`` format, transformer config) of the student."""


@dataclass
class TrainState:
    """Everything besides model/optimizer/scheduler/RNG that a resumed run needs."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of this epoch already consumed by this rank
    samples_seen: int = 0
    bad_samples: int = 0
    skipped_nonfinite: int = 0
    consecutive_nonfinite: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class ResumableSampler(Sampler[int]):
    """Per-epoch seeded permutation, sharded by rank, started at a given micro-batch of an epoch."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.start_batch = 0, 0
        if self.batches_per_epoch == 0:
            raise ValueError(f"the dataset has {num_samples} samples: fewer than one batch of {batch_size} per "
                             f"process ({world_size} processes). Use a smaller --train_batch_size or more data.")

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.world_size // self.batch_size

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)[self.rank::self.world_size]
        order = order[: self.batches_per_epoch * self.batch_size]
        return iter(order[self.start_batch * self.batch_size:].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class _StopRequest:
    """SIGTERM/SIGINT → finish the current step, checkpoint, exit 0."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name


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
    return DeepSpeedPlugin(hf_ds_config=config)


def build_accelerator(args: argparse.Namespace) -> Accelerator:
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
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")),
    )
    if plugin is not None and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise TrainingError(f"--ds_file was given but accelerate runs as {accelerator.distributed_type.value}, not "
                            "DeepSpeed (ACCELERATE_USE_CPU=true turns DeepSpeed off; on CPU set DS_ACCELERATOR=cpu instead).")
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise TrainingError(f"accelerate sees {accelerator.num_processes} processes but WORLD_SIZE={expected}: the "
                           "launch is misconfigured (on CPU use torchrun with ACCELERATE_USE_CPU=true).")
    logger.info("distributed type %s, %d process(es), mixed precision %s", accelerator.distributed_type.value,
                accelerator.num_processes, accelerator.mixed_precision)
    return accelerator


def check_output_dir_writable(output_dir: str) -> None:
    """Fail early, without creating anything, when ``output_dir`` could not be written."""
    path = Path(output_dir).absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"--output_dir {output_dir} is not writable ({path} does not allow writing). "
                              "Choose a writable folder.")


def _weight_dtype(accelerator: Accelerator) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)


def load_transformers(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    """Teacher and student FLUX transformers, both with the rescaled weights when given."""
    models = []
    for _ in range(2):
        transformer = load_flux_transformer(args.pretrained_model_name_or_path, args.timestep_scale, revision=args.revision)
        if args.rescaled_checkpoint_path:
            load_transformer_weights(transformer, args.rescaled_checkpoint_path)
        models.append(transformer)
    return models[0], models[1]


def run_config(args: argparse.Namespace, method: DistillMethod, accelerator: Accelerator) -> dict:
    return {**{k: v for k, v in vars(args).items() if not k.startswith("_")},
            "method": method.name, "num_processes": accelerator.num_processes}


def _save_checkpoint(accelerator, args, method, student, state: TrainState, config: dict) -> Path | None:
    tmp = None
    if accelerator.is_main_process:
        tmp = ckpt.begin_checkpoint(args.output_dir, state.step)
    accelerator.wait_for_everyone()
    tmp = Path(args.output_dir) / "checkpoints" / f".checkpoint-{state.step}.tmp"
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    final = None
    if accelerator.is_main_process:
        final = ckpt.finish_checkpoint(tmp, state.step, config, args.checkpoints_total_limit)
        module, transformer_config = method.export_state_dict(accelerator.unwrap_model(student))
        ckpt.export_transformer(Path(args.output_dir) / "ckpts" / f"transformer_{state.step}.pt",
                                module, transformer_config, state.step)
    accelerator.wait_for_everyone()
    return final


def _nonfinite_terms(out: LossOutput | None) -> list[str]:
    if out is None:
        return []
    return [name for name, value in out.terms.items() if not torch.isfinite(value).all()]


def train(args: argparse.Namespace, method: DistillMethod) -> TrainState:
    """Run (or resume) a training job; returns the final train state."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_output_dir_writable(args.output_dir)
    accelerator = build_accelerator(args)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # Models: identical initialisation on every rank, then per-rank random streams for the loss.
    set_seed(args.seed)
    # Text encoders in the training precision (T5-XXL is 19 GB in fp32); the VAE stays fp32 (84 M params).
    pipe = load_flux_components(args.pretrained_model_name_or_path, revision=args.revision,
                                dtype=_weight_dtype(accelerator))
    pipe.vae.to(torch.float32)
    check_resolution(args.resolution, pipe.vae_scale_factor)
    conditioner = FluxConditioner(pipe, accelerator.device, args.max_sequence_length)
    teacher_tf, student_tf = load_transformers(args)
    student, teacher = method.build_models(args, teacher_tf, student_tf)
    teacher.requires_grad_(False).eval().to(accelerator.device, _weight_dtype(accelerator))
    if args.gradient_checkpointing:
        student_tf.enable_gradient_checkpointing()
    student.train()

    hf_dataset = load_hf_dataset(args.dataset_name, args.data_files, args.data_dir, cache_dir=args.cache_dir)
    dataset = Text2ImageDataset(hf_dataset, args.resolution, args.image_column, args.caption_column,
                                center_crop=args.center_crop, random_flip=args.random_flip, data_dir=args.data_dir,
                                seed=args.seed)
    sampler = ResumableSampler(len(dataset), args.train_batch_size, accelerator.process_index,
                               accelerator.num_processes, args.seed)
    loader = DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, collate_fn=dataset.collate_fn,
                        num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed))

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    from diffusers.optimization import get_scheduler
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    config = run_config(args, method, accelerator)

    if args.resume_from_checkpoint:
        path = ckpt.resolve_resume_path(args.output_dir, args.resume_from_checkpoint)
        if path is None:
            logger.info("no checkpoint in %s yet: starting from scratch", args.output_dir)
        else:
            ckpt.check_resume_config(path, config)
            accelerator.load_state(str(path))  # model, optimizer, scheduler, RNG of this rank, train state
            logger.info("resumed from %s at step %d", path, state.step)
    if state.step == 0:
        set_seed(args.seed + accelerator.process_index)  # per-rank noise; restored RNG wins on resume

    if accelerator.is_main_process:  # inputs are valid: only now does the run folder appear
        Path(args.output_dir, "logs").mkdir(parents=True, exist_ok=True)
        tracker_config = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(f"t2i-distill-{method.name}", config=tracker_config)
    metrics_file = Path(args.output_dir, "logs", "metrics.jsonl")
    stop = _StopRequest()
    stop.install()
    unwrapped = accelerator.unwrap_model(student)
    progress = tqdm(total=args.max_train_steps, initial=state.step, desc=f"{method.name} steps",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    last_save_step = state.step if args.resume_from_checkpoint else -1

    while state.step < args.max_train_steps and not stop.requested:
        sampler.set_position(state.epoch, state.batches_in_epoch)
        dataset.set_epoch(state.epoch)  # crops/flips seeded by (seed, epoch, index): resumable
        for batch in loader:
            state.batches_in_epoch += 1
            state.samples_seen += len(batch["indices"]) + len(batch["bad_indices"])
            state.bad_samples += len(batch["bad_indices"])
            for index, reason in zip(batch["bad_indices"], batch["bad_reasons"]):
                logger.warning("skipping bad sample %d: %s", index, reason)
            step_start = time.time()
            out, finite, grad_norm = None, True, None
            with accelerator.accumulate(student):
                if batch["pixel_values"].shape[0] > 0:
                    latents, inputs = conditioner(batch["pixel_values"], batch["captions"])
                    out = method.loss(student, unwrapped, teacher, latents, inputs, state.step)
                    finite = bool(torch.isfinite(out.loss))
                # One all-reduce decides for every rank: skip (bad numbers / empty batch), stop, or step.
                flags = torch.tensor([float(not finite), float(out is None), float(stop.requested)],
                                     device=accelerator.device)
                any_nonfinite, any_empty, any_stop = (bool(v > 0) for v in accelerator.reduce(flags, "sum").tolist())
                stop.requested = stop.requested or any_stop
                if not (any_nonfinite or any_empty):
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients and accelerator.distributed_type != DistributedType.DEEPSPEED:
                        # DeepSpeed clips inside its engine (gradient_clipping is set from --max_grad_norm).
                        grad_norm = accelerator.clip_grad_norm_(student.parameters(), args.max_grad_norm)
                        any_nonfinite = not torch.isfinite(grad_norm)
                    if not any_nonfinite:
                        optimizer.step()
                        lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if any_nonfinite:
                state.skipped_nonfinite += 1
                state.consecutive_nonfinite += 1
                culprits = _nonfinite_terms(out) or ["loss" if not finite else "gradients"]
                logger.warning("step %d: non-finite %s; update skipped (%d in a row)", state.step,
                               ", ".join(culprits), state.consecutive_nonfinite)
                if state.consecutive_nonfinite >= args.max_nonfinite_steps:
                    _save_checkpoint(accelerator, args, method, student, state, config)
                    raise TrainingError(
                        f"{state.consecutive_nonfinite} consecutive non-finite steps (last: {', '.join(culprits)}). "
                        f"State saved in {args.output_dir}/checkpoints; lower --learning_rate or inspect the data.")
            elif not any_empty and accelerator.sync_gradients:
                state.consecutive_nonfinite = 0
                state.step += 1
                progress.update(1)
                if state.step % args.logging_steps == 0:
                    logs = {**out.logs, "lr": lr_scheduler.get_last_lr()[0], "step_time": time.time() - step_start,
                            "bad_samples": state.bad_samples, "skipped_nonfinite": state.skipped_nonfinite}
                    if grad_norm is not None:
                        logs["grad_norm"] = float(grad_norm)
                    progress.set_postfix(loss=f"{out.loss.item():.4f}")
                    accelerator.log(logs, step=state.step)
                    if accelerator.is_main_process:
                        with open(metrics_file, "a") as f:
                            f.write(json.dumps({"step": state.step, **logs}) + "\n")
            if state.samples_seen and state.bad_samples / state.samples_seen > args.max_bad_sample_fraction:
                raise TrainingError(f"{state.bad_samples} of {state.samples_seen} samples were unreadable "
                                   f"(> --max_bad_sample_fraction {args.max_bad_sample_fraction}); check the dataset.")
            done = state.step >= args.max_train_steps
            periodic = state.step > 0 and state.step % args.checkpointing_steps == 0
            if (periodic or done or stop.requested) and state.step != last_save_step:
                _save_checkpoint(accelerator, args, method, student, state, config)
                last_save_step = state.step
            if done or stop.requested:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0

    progress.close()
    if stop.requested and accelerator.is_main_process:
        print(f"Stopped by {stop.signal_name or 'a signal'} at step {state.step}; state saved. Resume with "
              f"--resume_from_checkpoint latest --output_dir {args.output_dir}", file=sys.stderr)
    accelerator.end_training()
    return state
