"""The one training loop shared by every method (sCM, MeanFlow, teacher rescaling).

A method supplies three things (:class:`DistillMethod`): how to wrap the loaded FLUX transformers
into a trainable student and a frozen teacher, its loss, and what to export.  Everything else lives
here once: accelerate/DeepSpeed set-up, data, optimisation, exact resume, atomic checkpoints,
preemption, bad-data and non-finite-step handling, logging.

Exact resume.  A resumed run continues the same sequence of updates bit for bit:
  * the data order comes from :class:`ResumableSampler` (a permutation per epoch seeded by ``seed``
    and the epoch, sharded by rank) whose position (epoch, micro-batches consumed) is part of the
    checkpointed :class:`TrainState`; crops/flips are seeded by (seed, epoch, index);
  * the loss draws its noise from the global torch RNG of each rank, which accelerate saves per rank
    (``random_states_<rank>.pkl``) and restores; the DataLoader has its own generator, so creating an
    iterator never consumes global random numbers;
  * optimizer, LR scheduler (stepped exactly once per applied update, whatever the number of
    processes) and accelerate's accumulation counter are restored by ``load_state``.
Every decision that changes control flow (skip a step, stop, save) is all-reduced first, so all
ranks always take the same branch and the train state is identical on every rank (accelerate saves
custom objects from the main process only).

Robustness (see ``training/checkpointing.py`` for the on-disk side):
  * SIGTERM/SIGINT: the current optimizer step finishes, a full checkpoint is written, exit 0;
  * unreadable samples are skipped, counted and logged (``logs/events.jsonl``); the run stops once the
    distinct unreadable samples exceed ``--max_bad_sample_fraction`` of the dataset;
  * a non-finite loss (on any rank) or gradient norm skips the whole optimizer step (weights, optimizer
    and LR schedule untouched); ``--max_nonfinite_steps`` consecutive ones save and stop, naming the
    non-finite ``LossOutput.terms``.  Mechanism: a non-finite micro-batch back-propagates ``loss·NaN``,
    which poisons every gradient of the accumulation window; the window is then dropped by the grad-norm
    check (DDP / single process) or by DeepSpeed's own overflow check, which skips its step and clears
    its gradient buffers (hence DeepSpeed runs must use bf16 or fp16, where that check exists);
  * a failed save (disk full, permissions) removes its temporary folder and stops with a clear error;
    earlier checkpoints are never touched.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, gather_object, set_seed
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

    # Optional: ``resume_invariants: tuple[str, ...]`` — extra flag names that must not change on resume.
    # Optional: ``setup(conditioner)`` — called once with the run's FluxConditioner before the models are
    #   built, for methods that need fixed text embeddings (MeanFlow's " ") from the same encoders.


@dataclass
class TrainState:
    """Everything besides model/optimizer/scheduler/RNG that a resumed run needs.

    Identical on every rank (all counters are global), because accelerate saves it from the main
    process only and every rank loads that one copy.
    """

    step: int = 0  # applied optimizer updates
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of this epoch already consumed (by each rank)
    samples_seen: int = 0  # sample reads, all ranks (a sample read in two epochs counts twice)
    bad_samples: int = 0  # unreadable sample reads, all ranks
    bad_indices: list[int] = field(default_factory=list)  # distinct unreadable dataset indices, sorted
    skipped_nonfinite: int = 0  # optimizer steps skipped for non-finite loss/gradients
    consecutive_nonfinite: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        known = {f.name for f in fields(self)}
        for key, value in state.items():
            if key in known:
                setattr(self, key, value)


class ResumableSampler(Sampler[int]):
    """Per-epoch seeded permutation, sharded by rank, started at a given micro-batch of an epoch.

    Epoch ``e`` visits ``randperm(N, seed·1000003 + e)[rank::world]``, truncated to whole batches, so
    every rank has the same number of micro-batches and the order is a pure function of
    (seed, epoch, rank): a resumed run only needs (epoch, micro-batches consumed).
    """

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

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's sample indices of ``epoch``, in order (whole batches only)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_samples, generator=g)[self.rank::self.world_size]
        return order[: self.batches_per_epoch * self.batch_size].tolist()

    def __iter__(self):
        return iter(self.epoch_order(self.epoch)[self.start_batch * self.batch_size:])

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch) * self.batch_size


class _StopRequest:
    """SIGTERM/SIGINT → finish the current optimizer step, checkpoint, exit 0.

    A second SIGINT (Ctrl-C twice) interrupts at once, as users expect; SIGTERM only ever sets the
    flag (schedulers send SIGKILL after their grace period anyway).  Previous handlers are restored
    when training returns, so calling :func:`train` in-process leaves the caller's handlers intact.
    """

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
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
    if config.get("bf16", {}).get("enabled"):
        # Non-finite steps are skipped by DeepSpeed's overflow check (see module docstring): make sure it is on.
        config["bf16"]["check_grad_overflow"] = True
    elif not config.get("fp16", {}).get("enabled"):
        raise ValueError(f"--ds_file {args.ds_file} enables neither bf16 nor fp16: fp32 ZeRO has no overflow check, "
                         "so a non-finite step could not be skipped. Enable bf16 (see parallel_config/).")
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
        # We step the LR scheduler once per applied update ourselves.  accelerate's default steps it
        # num_processes times per update, so a 2-process linear schedule would decay twice as fast.
        step_scheduler_with_optimizer=False,
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
            "method": method.name, "num_processes": accelerator.num_processes,
            "distributed_type": accelerator.distributed_type.value}


def check_dataset_readable(dataset: Text2ImageDataset, probes: int = 8) -> None:
    """Clear error up front when none of a few evenly spaced samples can be used.

    Catches a wrong ``--image_column`` (e.g. a text column), images stored in an unusable form, or a
    caption column that holds no text, before any output is written.  Isolated bad samples pass here
    and are skipped during training.
    """
    n = len(dataset)
    indices = sorted({round(i * (n - 1) / max(1, probes - 1)) for i in range(min(probes, n))})
    reasons = []
    for i in indices:
        sample = dataset[i]
        if "bad_reason" not in sample:
            return
        reasons.append(f"#{i}: {sample['bad_reason']}")
    raise ValueError(f"none of the {len(indices)} dataset samples checked can be used ({'; '.join(reasons[:3])}). "
                     "Check --image_column / --caption_column and that the image column holds images.")


def _substitute_batch(dataset: Text2ImageDataset, batch: dict, max_tries: int = 64) -> dict:
    """A one-sample batch replacing a micro-batch whose samples are all unreadable.

    Every rank must run a forward/backward on every micro-batch (DDP and DeepSpeed synchronise
    gradients inside backward), so an empty micro-batch cannot simply be skipped.  The substitute is
    the next readable sample after the first bad index: deterministic, hence resumable.
    """
    n = len(dataset)
    start = batch["bad_indices"][0]
    for k in range(1, min(n, max_tries) + 1):
        j = (start + k) % n
        sample = dataset[j]
        if "bad_reason" not in sample:
            out = dataset.collate_fn([sample])
            out["bad_indices"], out["bad_reasons"] = batch["bad_indices"], batch["bad_reasons"]
            return out
    raise TrainingError(f"samples {batch['bad_indices']} and the {min(n, max_tries)} following ones are all "
                        "unreadable; check the dataset.")


def _nonfinite_terms(out: LossOutput | None) -> list[str]:
    if out is None:
        return []
    return [name for name, value in out.terms.items()
            if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value.detach()).all())]


class _RunLog:
    """Main-process JSON-lines logs: ``logs/metrics.jsonl`` (one line per applied step) and
    ``logs/events.jsonl`` (bad samples, skipped steps, stops, saves)."""

    def __init__(self, output_dir: str, enabled: bool):
        self.metrics = Path(output_dir, "logs", "metrics.jsonl")
        self.events = Path(output_dir, "logs", "events.jsonl")
        self.enabled = enabled

    def _append(self, path: Path, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        except OSError as exc:  # e.g. a full disk: the next checkpoint save reports it clearly and stops
            logger.warning("could not append to %s: %s", path, exc)

    def metric(self, record: dict) -> None:
        self._append(self.metrics, record)

    def event(self, kind: str, **record) -> None:
        self._append(self.events, {"event": kind, "time": round(time.time(), 3), **record})

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop metric lines of steps after the checkpoint (they are recomputed)."""
        if not (self.enabled and self.metrics.exists()):
            return
        kept = []
        for line in self.metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill -9
            if record.get("step", 0) <= step:
                kept.append(line)
        ckpt.atomic_write_text(self.metrics, "".join(line + "\n" for line in kept))


def _any_rank(accelerator: Accelerator, flag: bool) -> bool:
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)


def _save_checkpoint(accelerator: Accelerator, args: argparse.Namespace, method: DistillMethod, student: nn.Module,
                     state: TrainState, config: dict, log: _RunLog) -> Path:
    """Collective: full state into ``.checkpoint-<step>.tmp``, export, then rename into place.

    Any failure (disk full, permissions, ...) on any rank removes the temporary folder and raises a
    :class:`TrainingError` on every rank; existing checkpoints are never modified.
    """
    out, step = args.output_dir, state.step
    tmp = Path(out) / "checkpoints" / f".checkpoint-{step}.tmp"
    final = Path(out) / "checkpoints" / f"checkpoint-{step}"
    failure: str | None = None

    def agree(failure: str | None) -> None:
        if not _any_rank(accelerator, failure is not None):
            return
        reasons = [r for r in gather_object([failure]) if r]
        if accelerator.is_main_process:
            ckpt.abort_checkpoint(out, step)
        previous = ckpt.list_checkpoints(out)
        kept = f"the previous checkpoints are intact (newest: {previous[-1][1]})" if previous else \
            "no earlier checkpoint exists"
        try:  # torch.save reports a full disk only as "unexpected pos ...": say how much space is left
            free = f"; {shutil.disk_usage(out).free / 2**20:.1f} MiB free on that disk"
        except OSError:
            free = ""
        log.event("save_failed", step=step, reason=reasons[0])
        raise TrainingError(f"could not save the checkpoint of step {step} in {out} ({reasons[0]}{free}). Its "
                            f"temporary folder was removed and {kept}. Free disk space or fix the folder's "
                            "permissions, then resume with --resume_from_checkpoint latest.")

    def describe(exc: BaseException) -> str:
        return f"{type(exc).__name__}: {exc}"

    if accelerator.is_main_process:
        try:
            ckpt.begin_checkpoint(out, step)
        except Exception as exc:  # noqa: BLE001 - reported to every rank, then raised as TrainingError
            failure = describe(exc)
    agree(failure)
    try:
        accelerator.save_state(str(tmp))
    except Exception as exc:  # noqa: BLE001 - e.g. RuntimeError("file write failed") from torch.save on ENOSPC
        failure = describe(exc)
    agree(failure)
    if accelerator.is_main_process:
        try:
            # Export before publishing the checkpoint: "checkpoint-N exists" implies "transformer_N.pt exists".
            module, transformer_config = method.export_state_dict(accelerator.unwrap_model(student))
            ckpt.export_transformer(ckpt.export_path(out, step), module, transformer_config, step)
            ckpt.finish_checkpoint(tmp, step, config, args.checkpoints_total_limit)
            ckpt.prune_exports(out, getattr(args, "exports_total_limit", None))
        except Exception as exc:  # noqa: BLE001
            failure = describe(exc)
    agree(failure)
    log.event("checkpoint", step=step, path=str(final))
    return final


def _check_resume_files(path: Path, accelerator: Accelerator) -> None:
    """accelerate silently skips a missing RNG file; a resumed run would then not be exact."""
    rng = path / f"random_states_{accelerator.process_index}.pkl"
    if not rng.is_file():
        raise FileNotFoundError(f"{path} has no {rng.name}: it was not written by a run with "
                                f"{accelerator.num_processes} process(es) or is incomplete.")


def train(args: argparse.Namespace, method: DistillMethod) -> TrainState:
    """Run (or resume) a training job; returns the final train state.

    Raises ``ValueError``/``FileNotFoundError``/``PermissionError`` for bad inputs before anything is
    written, and :class:`TrainingError` when the run must stop (bad data, bad numbers, failed save)
    after saving what can be saved.  Returns normally (exit 0) after a SIGTERM/SIGINT stop.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_output_dir_writable(args.output_dir)
    accelerator = build_accelerator(args)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # Which run are we continuing?  Decided first: a mismatch must fail before minutes of loading.
    config = run_config(args, method, accelerator)
    resume_path = None
    if args.resume_from_checkpoint:
        resume_path = ckpt.resolve_resume_path(args.output_dir, args.resume_from_checkpoint)
        if resume_path is None:
            logger.info("no checkpoint in %s yet: starting from scratch", args.output_dir)
        else:
            changed = ckpt.check_resume_config(resume_path, config, tuple(getattr(method, "resume_invariants", ())))
            if changed and accelerator.is_main_process:
                logger.warning("resuming with changed flags %s; the checkpoint's optimizer and LR-scheduler state "
                               "win over the new values where they overlap (e.g. --learning_rate)", changed)
            _check_resume_files(resume_path, accelerator)
    elif ckpt.list_checkpoints(args.output_dir):
        raise ValueError(f"--output_dir {args.output_dir} already holds checkpoints of a run. Continue it with "
                         "--resume_from_checkpoint latest, or choose a new --output_dir.")

    # Data before models: a missing column or an unreadable dataset fails in seconds, not after loading.
    hf_dataset = load_hf_dataset(args.dataset_name, args.data_files, args.data_dir, cache_dir=args.cache_dir)
    dataset = Text2ImageDataset(hf_dataset, args.resolution, args.image_column, args.caption_column,
                                center_crop=args.center_crop, random_flip=args.random_flip, data_dir=args.data_dir,
                                seed=args.seed)
    check_dataset_readable(dataset)

    # Models: identical initialisation on every rank, then per-rank random streams for the loss.
    set_seed(args.seed)
    # Text encoders in the training precision (T5-XXL is 19 GB in fp32); the VAE stays fp32 (84 M params).
    pipe = load_flux_components(args.pretrained_model_name_or_path, revision=args.revision,
                                dtype=_weight_dtype(accelerator))
    pipe.vae.to(torch.float32)
    check_resolution(args.resolution, pipe.vae_scale_factor)
    conditioner = FluxConditioner(pipe, accelerator.device, args.max_sequence_length)
    if hasattr(method, "setup"):
        method.setup(conditioner)
    teacher_tf, student_tf = load_transformers(args)
    student, teacher = method.build_models(args, teacher_tf, student_tf)
    teacher.requires_grad_(False).eval().to(accelerator.device, _weight_dtype(accelerator))
    if args.gradient_checkpointing:
        student_tf.enable_gradient_checkpointing()
    student.train()

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
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    if resume_path is not None:
        accelerator.load_state(str(resume_path))  # model, optimizer, scheduler, RNG of this rank, train state
        saved_step = ckpt.read_run_config(resume_path).get("step")
        if saved_step is not None and saved_step != state.step:
            raise TrainingError(f"{resume_path} is inconsistent: run_config.json says step {saved_step}, the train "
                                f"state says {state.step}.")
        logger.info("resumed from %s at step %d (epoch %d, micro-batch %d)", resume_path, state.step, state.epoch,
                    state.batches_in_epoch)
    else:
        set_seed(args.seed + accelerator.process_index)  # per-rank noise; on resume the restored RNG wins

    # Inputs are valid: only now does the run folder appear.
    log = _RunLog(args.output_dir, accelerator.is_main_process)
    if accelerator.is_main_process:
        Path(args.output_dir, "logs").mkdir(parents=True, exist_ok=True)
        if resume_path is not None:
            log.truncate_metrics(state.step)
            log.event("resume", step=state.step, path=str(resume_path))
        tracker_config = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(f"t2i-distill-{method.name}", config=tracker_config)

    stop = _StopRequest()
    stop.install()
    try:
        _train_loop(args, method, accelerator, state, config, log, stop, dataset, sampler, loader, conditioner,
                    student, teacher, optimizer, lr_scheduler, params, deepspeed,
                    last_save_step=state.step if resume_path is not None else -1)
    finally:
        stop.restore()
    if stop.requested and state.step < args.max_train_steps and accelerator.is_main_process:
        message = (f"Stopped by {stop.signal_name or 'a signal'} at step {state.step}; the full state is saved in "
                   f"{Path(args.output_dir, 'checkpoints', f'checkpoint-{state.step}')}. To continue, run the same "
                   f"command with --resume_from_checkpoint latest --output_dir {args.output_dir}")
        log.event("stopped", step=state.step, signal=stop.signal_name)
        logger.warning(message)
        print(message, file=sys.stderr, flush=True)
    accelerator.end_training()
    return state


def _train_loop(args, method, accelerator, state, config, log, stop, dataset, sampler, loader, conditioner,
                student, teacher, optimizer, lr_scheduler, params, deepspeed, last_save_step) -> None:
    progress = tqdm(total=args.max_train_steps, initial=state.step, desc=f"{method.name} steps",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    try:
        _run_steps(args, method, accelerator, state, config, log, stop, dataset, sampler, loader, conditioner,
                   student, teacher, optimizer, lr_scheduler, params, deepspeed, last_save_step, progress)
    finally:
        progress.close()


def _run_steps(args, method, accelerator, state, config, log, stop, dataset, sampler, loader, conditioner,
               student, teacher, optimizer, lr_scheduler, params, deepspeed, last_save_step, progress) -> None:
    unwrapped = accelerator.unwrap_model(student)
    main = accelerator.is_main_process
    bad_seen = set(state.bad_indices)
    # Per accumulation window: names of non-finite terms (None = all finite) and whether a stop was asked.
    window_culprits: list[str] | None = None
    culprits: list[str] = []
    stop_agreed = False
    max_nonfinite = max(1, args.max_nonfinite_steps)

    def save() -> None:
        nonlocal last_save_step
        if state.step != last_save_step:
            _save_checkpoint(accelerator, args, method, student, state, config, log)
            last_save_step = state.step

    while state.step < args.max_train_steps:
        sampler.set_position(state.epoch, state.batches_in_epoch)
        dataset.set_epoch(state.epoch)  # crops/flips seeded by (seed, epoch, index): resumable
        finished_epoch = True
        for batch in loader:
            state.batches_in_epoch += 1
            n_read, n_bad = len(batch["indices"]) + len(batch["bad_indices"]), len(batch["bad_indices"])
            if not batch["indices"]:
                batch = _substitute_batch(dataset, batch)
                logger.warning("micro-batch with only unreadable samples %s: trained on sample %d instead",
                               batch["bad_indices"], batch["indices"][0])
                log.event("substituted_batch", step=state.step, rank=accelerator.process_index,
                          bad_indices=batch["bad_indices"], substitute=batch["indices"][0])
            step_start = time.time()
            with accelerator.accumulate(student):  # entered exactly once per micro-batch
                latents, inputs = conditioner(batch["pixel_values"], batch["captions"])
                out = method.loss(student, unwrapped, teacher, latents, inputs, state.step)
                local_nonfinite = not bool(torch.isfinite(out.loss.detach()).all())
                # One all-reduce decides for every rank: non-finite loss anywhere, stop, data counters.
                flags = torch.tensor([float(local_nonfinite), float(stop.requested), float(n_read), float(n_bad)],
                                     dtype=torch.float64, device=accelerator.device)
                any_nonfinite, any_stop, reads, bads = accelerator.reduce(flags, "sum").tolist()
                stop_agreed = stop_agreed or any_stop > 0
                if any_nonfinite > 0:
                    names = [name for names in gather_object([_nonfinite_terms(out)]) for name in names]
                    window_culprits = list(dict.fromkeys((window_culprits or []) + (names or ["loss"])))
                    # loss·NaN poisons every gradient of this accumulation window on every rank, so the
                    # update is dropped below (grad-norm check) or by DeepSpeed's overflow check.
                    loss = out.loss * float("nan")
                else:
                    loss = out.loss
                accelerator.backward(loss)
                grad_norm, skipped = None, False
                if accelerator.sync_gradients:
                    if deepspeed:
                        skipped = accelerator.optimizer_step_was_skipped  # the engine already stepped
                        grad_norm = accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
                    else:
                        grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                        skipped = not bool(torch.isfinite(grad_norm))
                        if not skipped or accelerator.scaler is not None:
                            optimizer.step()  # with an fp16 GradScaler, the scaler skips and lowers its scale
                            skipped = skipped or accelerator.optimizer_step_was_skipped
                        optimizer.zero_grad(set_to_none=True)
                    if not skipped:
                        lr_scheduler.step()

            # ---- bookkeeping (identical on every rank: all inputs above were all-reduced) ----
            state.samples_seen += int(reads)
            state.bad_samples += int(bads)
            if bads > 0:
                for index, reason in gather_object(list(zip(batch["bad_indices"], batch["bad_reasons"]))):
                    if index not in bad_seen:
                        bad_seen.add(index)
                        if main:
                            logger.warning("skipping unreadable sample %d: %s", index, reason)
                        log.event("bad_sample", step=state.step, index=index, reason=reason)
                state.bad_indices = sorted(bad_seen)
            if not accelerator.sync_gradients:
                continue  # mid accumulation window: no step, no save, no stop

            if skipped:
                culprits = window_culprits or ["gradients"]
                state.skipped_nonfinite += 1
                state.consecutive_nonfinite += 1
                if main:
                    logger.warning("step %d: non-finite %s; update skipped (%d in a row, %d in total)",
                                   state.step + 1, ", ".join(culprits), state.consecutive_nonfinite,
                                   state.skipped_nonfinite)
                log.event("nonfinite_skip", step=state.step, terms=culprits,
                          consecutive=state.consecutive_nonfinite)
            else:
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
                    log.metric({"step": state.step, **logs})
            window_culprits = None

            if len(bad_seen) > args.max_bad_sample_fraction * len(dataset):
                save()
                raise TrainingError(
                    f"{len(bad_seen)} of the {len(dataset)} dataset samples are unreadable (more than "
                    f"--max_bad_sample_fraction {args.max_bad_sample_fraction}); first ones: "
                    f"{state.bad_indices[:10]} (reasons in {log.events}). Fix or filter the data, or raise the "
                    f"fraction and resume with --resume_from_checkpoint latest.")
            if state.consecutive_nonfinite >= max_nonfinite:
                save()
                raise TrainingError(
                    f"{state.consecutive_nonfinite} consecutive non-finite steps (non-finite: {', '.join(culprits)}); "
                    f"the last good weights (step {state.step}) are saved in "
                    f"{Path(args.output_dir, 'checkpoints', f'checkpoint-{state.step}')}. Lower --learning_rate, "
                    "check the teacher checkpoint and the data.")
            done = state.step >= args.max_train_steps
            periodic = not skipped and state.step % args.checkpointing_steps == 0
            if periodic or done or stop_agreed:
                save()
            if done or stop_agreed:
                finished_epoch = False
                break
        if stop_agreed:
            stop.requested = True  # every rank reports the stop, even one that never got the signal
            break
        if finished_epoch:
            state.epoch += 1
            state.batches_in_epoch = 0
