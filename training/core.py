"""The one training loop shared by every method (sCM, MeanFlow, teacher rescaling).

The pieces, each small and named:
  * :class:`DistillMethod` — what a method supplies: wrap the loaded FLUX transformers into a
    trainable student and a frozen teacher, its loss, and what to export;
  * ``training/launch.py`` — set-up, checked before anything is written: accelerator, resume point,
    conditioner (VAE + text encoders), models, optimizer;
  * ``training/train_data.py`` — :class:`TrainData`, the resumable, rank-sharded data stream;
  * :class:`Run` — everything a run works with, built once by :func:`train` and passed to every piece;
  * the step — :func:`_micro_step` (forward/backward of one micro-batch, with all-reduced decisions),
    :func:`_optimizer_step` (clip, step or skip), :func:`_end_window` (counters, hooks), then
    :func:`_check_limits` and :func:`save_checkpoint`;
  * ``training/hooks.py`` — :class:`Hook`: everything else is a hook with ``on_train_start /
    on_update / on_save / on_train_end`` and an optional ``state_dict / load_state_dict`` that is
    checkpointed generically (``hook_states.pt``).  Today: ``training/ema.py`` (EMA, first),
    ProgressBar and MetricsLogger (``hooks.py``; they feed ``training/trackers.py``) and
    ``training/validation.py`` (validation grids), built by :func:`build_hooks`;
  * ``training/stop.py`` — :class:`StopRequest`, signals → a clean stop at a step boundary, on every rank.
To add a feature: write a :class:`Hook` subclass (in its own module) and append it in
:func:`build_hooks`; the step itself should not need another branch.  To feed the step other
conditioning (e.g. precomputed embeddings), replace :attr:`Run.encode`; to read other data, give
:class:`Run` another object with :class:`TrainData`'s ``batches / substitute / __len__``.

Exact resume.  A resumed run continues the same sequence of updates bit for bit:
  * the data order comes from :class:`ResumableSampler` (a permutation per epoch seeded by ``seed``
    and the epoch, sharded by rank) whose position (epoch, micro-batches consumed) is part of the
    checkpointed :class:`TrainState`; crops/flips are seeded by (seed, epoch, index);
  * the loss draws its noise from the global torch RNG of each rank, which accelerate saves per rank
    (``random_states_<rank>.pkl``) and restores; the DataLoader has its own generator, so creating an
    iterator never consumes global random numbers;
  * optimizer, LR scheduler (stepped exactly once per applied update, whatever the number of
    processes) and accelerate's accumulation counter are restored by ``load_state``; hook states
    (``hook_states.pt``) by :func:`_restore`.
Every decision that changes control flow (skip a step, stop, save) is all-reduced first, so all
ranks always take the same branch and the train state is identical on every rank (accelerate saves
custom objects from the main process only).

Robustness (see ``training/checkpointing.py`` for the on-disk side):
  * SIGTERM/SIGINT/SIGUSR1, to one rank or to the whole process group (DataLoader workers ignore them,
    ``training/stop.py``): the current optimizer step finishes on every rank, a full checkpoint is
    written, exit 0;
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
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from torch import nn

from model.trigflow import FluxInputs
from training import checkpointing as ckpt
from data.conditioning_cache import CachedConditioner, open_conditioning_cache
from training.common import LossOutput, TrainingError
from training.ema import EMA
from training.hooks import Hook, MetricsLogger, ProgressBar, RunLog, Update
from training.launch import (build_accelerator, build_conditioner, build_models, build_optimizer,
                             check_output_dir_writable, resume_point, run_config, weight_dtype)
from training.lora import attach_lora, lora_spec
from training.stop import StopRequest
from training.streaming_data import build_streaming_data
from training.trackers import start_trackers
from training.train_data import ResumableSampler, TrainData, load_train_dataset
from training.validation import Validation, read_validation_prompts

__all__ = ["DistillMethod", "Run", "TrainState", "ResumableSampler", "train", "save_checkpoint", "build_hooks"]

logger = logging.getLogger("t2i_distill")
HOOK_STATES = "hook_states.pt"


class DistillMethod(Protocol):
    name: str

    def build_models(self, args: argparse.Namespace, teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(trainable student module, frozen teacher module) from two FLUX transformers with the same weights.

        ``teacher`` is None when the method says ``uses_teacher = False`` (training/launch.py does not copy it)."""

    def loss(self, student: nn.Module, student_unwrapped: nn.Module, teacher: nn.Module,
             latents: torch.Tensor, inputs: FluxInputs, step: int) -> LossOutput:
        """The method's loss on one batch of packed latents."""

    def export_state_dict(self, student_unwrapped: nn.Module) -> tuple[dict, dict]:
        """(state dict in the original ``module`` format, transformer config) of the student."""

    # Optional: ``uses_teacher: bool`` (default True) — False when the loss never calls the teacher.
    # Optional: ``resume_invariants: tuple[str, ...]`` — extra flag names that must not change on resume.
    # Optional: ``setup(conditioner)`` — called once with the run's FluxConditioner before the models are
    #   built, for methods that need fixed text embeddings (MeanFlow's " ") from the same encoders.


@dataclass
class TrainState:
    """Everything besides model/optimizer/scheduler/RNG/hooks that a resumed run needs.

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


@dataclass
class Run:
    """Everything one training run works with; built once by :func:`train`, passed to every piece."""

    args: argparse.Namespace
    method: DistillMethod
    accelerator: Accelerator
    student: nn.Module  # prepared: possibly DDP/DeepSpeed-wrapped
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    data: TrainData
    encode: Callable[[dict], tuple[torch.Tensor, FluxInputs]]  # micro-batch → (packed latents, inputs)
    components: object  # FluxPipeline without transformer (VAE, text encoders, tokenizers, scheduler)
    config: dict  # run_config.json of every checkpoint
    hooks: list[Hook]
    state: TrainState = field(default_factory=TrainState)
    stop: StopRequest = field(default_factory=StopRequest)
    stop_agreed: bool = False  # some rank was asked to stop (all-reduced): stop after this update
    last_saved_step: int = -1
    # How a checkpoint's model state and exports are written (LoRA runs replace them: training/lora.py).
    save_state_kwargs: dict = field(default_factory=dict)
    load_state_kwargs: dict = field(default_factory=dict)
    # main process: export(run, step, suffix=""); None = export_full_student
    export: Callable[..., None] | None = None
    log: RunLog = field(init=False)

    def __post_init__(self):
        self.log = RunLog(self.args.output_dir, self.accelerator.is_main_process)
        self.unwrapped = self.accelerator.unwrap_model(self.student)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class _Window:
    """One accumulation window: ``gradient_accumulation_steps`` micro-batches → one optimizer update."""

    culprits: list[str] | None = None  # names of the non-finite loss terms seen (None: all finite)
    out: LossOutput | None = None  # of the last micro-batch
    grad_norm: torch.Tensor | float | None = None
    skipped: bool = False
    started: float = 0.0  # time.time() at the start of the last micro-batch
    opened: float | None = None  # time.time() at the start of the first micro-batch
    samples: int = 0  # sample reads of the window, all ranks


def build_hooks(args: argparse.Namespace) -> list[Hook]:
    """The run's hooks, in call order (new features append theirs here)."""
    hooks: list[Hook] = []
    if args.use_ema:  # first: later hooks (metrics, validation) see this update's average
        hooks.append(EMA(args.ema_decay, args.ema_power, "cpu" if args.ema_device == "cpu" else None))
    hooks += [ProgressBar(), MetricsLogger(args.logging_steps)]
    prompts = read_validation_prompts(args)
    if prompts:
        hooks.append(Validation(prompts, args.validation_steps, args.num_validation_images,
                                args.validation_resolution or args.resolution, args.validation_seed))
    return hooks


def train(args: argparse.Namespace, method: DistillMethod) -> TrainState:
    """Run (or resume) a training job; returns the final train state.

    Raises ``ValueError``/``FileNotFoundError``/``PermissionError`` for bad inputs before anything is
    written, and :class:`TrainingError` when the run must stop (bad data, bad numbers, failed save)
    after saving what can be saved.  Returns normally (exit 0) after a SIGTERM/SIGINT/SIGUSR1 stop.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_output_dir_writable(args.output_dir)
    accelerator = build_accelerator(args)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    config = run_config(args, method, accelerator)
    # Which run are we continuing?  Decided first: a mismatch must fail before minutes of loading.
    resume_path = resume_point(args, method, config, accelerator)
    # Data before models: a missing column or an unreadable dataset fails in seconds, not after loading.
    data = build_train_data(args, accelerator)
    hooks = build_hooks(args)
    if args.conditioning_cache and any(isinstance(h, Validation) for h in hooks):
        raise ValueError("--validation_prompt needs the text encoders and the VAE, which --conditioning_cache leaves "
                         "unloaded: drop one of the two")

    set_seed(args.seed)  # identical initialisation on every rank
    if args.conditioning_cache:  # embeddings and latents read from disk: no text encoder, no VAE
        conditioner = CachedConditioner(args.conditioning_cache, accelerator.device)
        encode = conditioner.encode
    else:
        conditioner = build_conditioner(args, accelerator)
        encode = lambda batch: conditioner(batch["pixel_values"], batch["captions"])  # noqa: E731
    if hasattr(method, "setup"):
        method.setup(conditioner)
    student, teacher, _ = build_models(args, method, accelerator)
    optimizer, lr_scheduler = build_optimizer(args, student)
    student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    run = Run(args, method, accelerator, student, teacher, optimizer, lr_scheduler, data,
              encode=encode, components=None if args.conditioning_cache else conditioner.pipe,
              config=config, hooks=hooks)
    if lora_spec(args) is not None:
        attach_lora(run)  # before _restore: checkpoints hold only the trainable tensors
    accelerator.register_for_checkpointing(run.state)
    if resume_path is not None:
        _restore(run, resume_path)
    else:
        set_seed(args.seed + accelerator.process_index)  # per-rank noise; on resume the restored RNG wins
    _open_logs(run, resume_path)

    run.stop.install()
    try:
        for hook in run.hooks:
            hook.on_train_start(run)
        _train_loop(run)
    finally:
        run.stop.restore()
        for hook in run.hooks:
            hook.on_train_end(run)
    _report_stop(run)
    accelerator.end_training()
    return run.state


def _restore(run: Run, path: Path) -> None:
    """Model, optimizer, scheduler, this rank's RNG, train state (accelerate), then the hook states."""
    run.accelerator.load_state(str(path), **run.load_state_kwargs)
    state = run.state
    saved_step = ckpt.read_run_config(path).get("step")
    if saved_step is not None and saved_step != state.step:
        raise TrainingError(f"{path} is inconsistent: run_config.json says step {saved_step}, the train "
                            f"state says {state.step}.")
    hook_file = path / HOOK_STATES
    states = torch.load(hook_file, map_location="cpu", weights_only=True, mmap=True) if hook_file.is_file() else {}
    for hook in run.hooks:
        if hook.name in states:
            hook.load_state_dict(states[hook.name])
    run.last_saved_step = state.step
    logger.info("resumed from %s at step %d (epoch %d, micro-batch %d)", path, state.step, state.epoch,
                state.batches_in_epoch)


def _open_logs(run: Run, resume_path: Path | None) -> None:
    """Inputs are valid: only now does the run folder appear."""
    if not run.main:
        return
    Path(run.args.output_dir, "logs").mkdir(parents=True, exist_ok=True)
    if resume_path is not None:
        run.log.truncate_metrics(run.state.step)
        run.log.event("resume", step=run.state.step, path=str(resume_path))
    start_trackers(run.accelerator, f"t2i-distill-{run.method.name}", run.config, run.args.output_dir)


def _report_stop(run: Run) -> None:
    state, args = run.state, run.args
    if not (run.stop.requested and state.step < args.max_train_steps and run.main):
        return
    message = (f"Stopped by {run.stop.signal_name or 'a signal'} at step {state.step}; the full state is saved in "
               f"{Path(args.output_dir, 'checkpoints', f'checkpoint-{state.step}')}. To continue, run the same "
               f"command with --resume_from_checkpoint latest --output_dir {args.output_dir}")
    run.log.event("stopped", step=state.step, signal=run.stop.signal_name)
    logger.warning(message)
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ the loop

def _train_loop(run: Run) -> None:
    state = run.state
    window = _Window()
    while state.step < run.args.max_train_steps:
        finished_epoch = True
        for batch in run.data.batches(state.epoch, state.batches_in_epoch):
            state.batches_in_epoch += 1
            _micro_step(run, batch, window)
            if not run.accelerator.sync_gradients:
                continue  # mid accumulation window: no step, no save, no stop
            culprits = _end_window(run, window)
            window = _Window()
            _check_limits(run, culprits)
            done = state.step >= run.args.max_train_steps
            periodic = culprits is None and state.step % run.args.checkpointing_steps == 0
            if periodic or done or run.stop_agreed:
                _save(run)
            if done or run.stop_agreed:
                finished_epoch = False
                break
        if run.stop_agreed:
            run.stop.requested = True  # every rank reports the stop, even one that never got the signal
            break
        if finished_epoch:
            state.epoch += 1
            state.batches_in_epoch = 0


def _micro_step(run: Run, batch: dict, window: _Window) -> None:
    """Forward and backward of one micro-batch; the optimizer update at the end of a window."""
    acc = run.accelerator
    n_read, n_bad = len(batch["indices"]) + len(batch["bad_indices"]), len(batch["bad_indices"])
    if not batch["indices"]:
        batch = run.data.substitute(batch)
        logger.warning("micro-batch with only unreadable samples %s: trained on sample %d instead",
                       batch["bad_indices"], batch["indices"][0])
        run.log.event("substituted_batch", step=run.state.step, rank=acc.process_index,
                      bad_indices=batch["bad_indices"], substitute=batch["indices"][0])
    window.started = time.time()
    window.opened = window.opened or window.started
    with acc.accumulate(run.student):  # entered exactly once per micro-batch
        latents, inputs = run.encode(batch)
        out = run.method.loss(run.student, run.unwrapped, run.teacher, latents, inputs, run.state.step)
        local_nonfinite = not bool(torch.isfinite(out.loss.detach()).all())
        # One all-reduce decides for every rank: non-finite loss anywhere, stop, data counters.
        flags = torch.tensor([float(local_nonfinite), float(run.stop.requested), float(n_read), float(n_bad)],
                             dtype=torch.float64, device=acc.device)
        any_nonfinite, any_stop, reads, bads = acc.reduce(flags, "sum").tolist()
        run.stop_agreed = run.stop_agreed or any_stop > 0
        loss = out.loss
        if any_nonfinite > 0:
            names = [name for names in gather_object([_nonfinite_terms(out)]) for name in names]
            window.culprits = list(dict.fromkeys((window.culprits or []) + (names or ["loss"])))
            # loss·NaN poisons every gradient of this accumulation window on every rank, so the
            # update is dropped by _optimizer_step (grad-norm check) or by DeepSpeed's overflow check.
            loss = out.loss * float("nan")
        acc.backward(loss)
        if acc.sync_gradients:
            window.grad_norm, window.skipped = _optimizer_step(run)
    window.out = out
    window.samples += int(reads)
    _count_samples(run, batch, int(reads), int(bads))


def _optimizer_step(run: Run) -> tuple[torch.Tensor | float | None, bool]:
    """Clip and apply the accumulated gradients, or skip when they are non-finite: (grad norm, skipped)."""
    acc = run.accelerator
    if run.deepspeed:
        skipped = acc.optimizer_step_was_skipped  # the engine already stepped (or skipped, on overflow)
        grad_norm = acc.deepspeed_engine_wrapped.get_global_grad_norm()
    else:
        grad_norm = acc.clip_grad_norm_(run.params, run.args.max_grad_norm)
        skipped = not bool(torch.isfinite(grad_norm))
        if not skipped or acc.scaler is not None:
            run.optimizer.step()  # with an fp16 GradScaler, the scaler skips and lowers its scale
            skipped = skipped or acc.optimizer_step_was_skipped
        run.optimizer.zero_grad(set_to_none=True)
    if not skipped:
        run.lr_scheduler.step()
    return grad_norm, skipped


def _count_samples(run: Run, batch: dict, reads: int, bads: int) -> None:
    """Data counters (all-reduced, so identical on every rank) and the first report of each bad sample."""
    state = run.state
    state.samples_seen += reads
    state.bad_samples += bads
    if bads == 0:
        return
    seen = set(state.bad_indices)
    for index, reason in gather_object(list(zip(batch["bad_indices"], batch["bad_reasons"]))):
        if index not in seen:
            seen.add(index)
            if run.main:
                logger.warning("skipping unreadable sample %d: %s", index, reason)
            run.log.event("bad_sample", step=state.step, index=index, reason=reason)
    state.bad_indices = sorted(seen)


def _end_window(run: Run, window: _Window) -> list[str] | None:
    """Count a skipped update (returns the non-finite culprits) or an applied one (runs the hooks)."""
    state = run.state
    if window.skipped:
        culprits = window.culprits or ["gradients"]
        state.skipped_nonfinite += 1
        state.consecutive_nonfinite += 1
        if run.main:
            logger.warning("step %d: non-finite %s; update skipped (%d in a row, %d in total)", state.step + 1,
                           ", ".join(culprits), state.consecutive_nonfinite, state.skipped_nonfinite)
        run.log.event("nonfinite_skip", step=state.step, terms=culprits, consecutive=state.consecutive_nonfinite)
        return culprits
    state.consecutive_nonfinite = 0
    state.step += 1
    grad_norm = None if window.grad_norm is None else float(window.grad_norm)
    now = time.time()
    update = Update(state.step, window.out, grad_norm, run.lr_scheduler.get_last_lr()[0], now - window.started,
                    window.samples / max(now - window.opened, 1e-9))
    for hook in run.hooks:
        hook.on_update(run, update)
    return None


def _check_limits(run: Run, culprits: list[str] | None) -> None:
    """Save and stop when too many samples are unreadable or too many steps in a row were non-finite."""
    state, args = run.state, run.args
    if len(state.bad_indices) > args.max_bad_sample_fraction * len(run.data):
        _save(run)
        raise TrainingError(
            f"{len(state.bad_indices)} of the {len(run.data)} dataset samples are unreadable (more than "
            f"--max_bad_sample_fraction {args.max_bad_sample_fraction}); first ones: "
            f"{state.bad_indices[:10]} (reasons in {run.log.events}). Fix or filter the data, or raise the "
            f"fraction and resume with --resume_from_checkpoint latest.")
    if culprits is not None and state.consecutive_nonfinite >= max(1, args.max_nonfinite_steps):
        _save(run)
        # The saved weights are those of the last *finite* update, which may itself be what blew up the
        # following steps (e.g. --learning_rate 1e8): report their size instead of calling them good.
        largest = max((float(p.detach().abs().max()) for p in run.unwrapped.parameters() if p.numel()), default=0.0)
        raise TrainingError(
            f"{state.consecutive_nonfinite} consecutive non-finite steps (non-finite: {', '.join(culprits)}); "
            f"the weights after the last finite update (step {state.step}, max |weight| {largest:.3g}) are saved in "
            f"{Path(args.output_dir, 'checkpoints', f'checkpoint-{state.step}')}; if that update diverged they "
            "are the cause, so restart from an earlier checkpoint or from scratch. Lower --learning_rate, "
            "check the teacher checkpoint and the data.")


def _nonfinite_terms(out: LossOutput) -> list[str]:
    return [name for name, value in out.terms.items()
            if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value.detach()).all())]


# ------------------------------------------------------------------------------------------ saving

def _save(run: Run) -> None:
    if run.state.step != run.last_saved_step:
        save_checkpoint(run)
        run.last_saved_step = run.state.step


def _any_rank(accelerator: Accelerator, flag: bool) -> bool:
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)


def _publish(run: Run, tmp: Path) -> None:
    """Main process, once every rank wrote its state into ``tmp``: exports and hook states, then the rename.

    Exports come first: "checkpoint-N exists" implies "transformer_N.pt (and the hooks' exports) exist".
    """
    args, step = run.args, run.state.step
    (run.export or export_full_student)(run, step)
    for hook in run.hooks:
        hook.on_save(run, step)
    states = {hook.name: s for hook in run.hooks if (s := hook.state_dict()) is not None}
    if states:
        ckpt.atomic_torch_save(states, tmp / HOOK_STATES)
    ckpt.finish_checkpoint(tmp, step, run.config, args.checkpoints_total_limit)


def export_full_student(run: Run, step: int) -> None:
    """``ckpts/transformer_<step>.pt`` in the original ``{'module': ...}`` format; prunes older ones."""
    module, transformer_config = run.method.export_state_dict(run.unwrapped)
    ckpt.export_transformer(ckpt.export_path(run.args.output_dir, step), module, transformer_config, step)
    ckpt.prune_exports(run.args.output_dir, getattr(run.args, "exports_total_limit", None))


def build_train_data(args: argparse.Namespace, accelerator: Accelerator):
    """The map-style :class:`TrainData` (over images, or over ``--conditioning_cache``), or with ``--streaming`` a
    :class:`StreamingTrainData`."""
    if args.conditioning_cache:  # precomputed embeddings and latents (data/conditioning_cache.py)
        if getattr(args, "streaming", False):
            raise ValueError("--streaming reads images; --conditioning_cache reads precomputed latents: use one of them")
        return TrainData(open_conditioning_cache(args, weight_dtype(accelerator)), args.train_batch_size,
                         accelerator.process_index, accelerator.num_processes, args.seed, args.dataloader_num_workers)
    if getattr(args, "streaming", False):
        all_ranks = lambda flag: not _any_rank(accelerator, not flag)
        return build_streaming_data(args, accelerator.process_index, accelerator.num_processes, all_ranks)
    return TrainData(load_train_dataset(args), args.train_batch_size, accelerator.process_index,
                     accelerator.num_processes, args.seed, args.dataloader_num_workers)


def save_checkpoint(run: Run) -> Path:
    """Collective: full state into ``.checkpoint-<step>.tmp``, exports, then rename into place.

    Any failure (disk full, permissions, ...) on any rank removes the temporary folder and raises a
    :class:`TrainingError` on every rank; existing checkpoints are never modified.
    """
    accelerator, args = run.accelerator, run.args
    out, step = args.output_dir, run.state.step
    tmp = Path(out) / "checkpoints" / f".checkpoint-{step}.tmp"
    final = Path(out) / "checkpoints" / f"checkpoint-{step}"

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
        run.log.event("save_failed", step=step, reason=reasons[0])
        raise TrainingError(f"could not save the checkpoint of step {step} in {out} ({reasons[0]}{free}). Its "
                            f"temporary folder was removed and {kept}. Free disk space or fix the folder's "
                            "permissions, then resume with --resume_from_checkpoint latest.")

    def attempt(action: Callable[[], object], main_only: bool) -> None:
        failure = None
        if accelerator.is_main_process or not main_only:
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - reported to every rank, then raised as TrainingError
                failure = f"{type(exc).__name__}: {exc}"  # e.g. RuntimeError("file write failed") on ENOSPC
        agree(failure)

    attempt(lambda: ckpt.begin_checkpoint(out, step), main_only=True)
    attempt(lambda: accelerator.save_state(str(tmp), **run.save_state_kwargs), main_only=False)
    attempt(lambda: _publish(run, tmp), main_only=True)
    run.log.event("checkpoint", step=step, path=str(final))
    return final
