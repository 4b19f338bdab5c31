"""Test-only fault injection for the training core (never imported by production code).

In-process tests use the helpers directly (argument builders, fault-injecting method subclasses,
metrics/export readers).  Subprocess tests (SIGTERM, ``kill -9`` during a save, which rank writes)
put ``tests/fault_hooks`` on ``PYTHONPATH`` and describe the faults in the ``T2I_FAULTS`` environment
variable (JSON); ``tests/fault_hooks/sitecustomize.py`` then calls :func:`install_from_env` in every
Python process that starts, torchrun workers included, before the entry point runs.

``T2I_FAULTS`` keys:
  ``slow_step``: seconds to sleep in every conditioning call (makes the timing of an external signal
      land in the middle of training rather than after it);
  ``stall``: ``{"step": N, "at": WHERE}`` — write the marker file ``T2I_FAULT_MARKER`` and sleep until
      killed, at one point of the save of step N.  WHERE is
        "save_state"  half-way through writing optimizer.bin inside ``.checkpoint-N.tmp``,
        "export"      half-way through writing ``ckpts/.transformer_N.pt.tmp``,
        "rename"      with the temporary folder and the export complete, before the rename,
        "prune"       after pruning renamed an old checkpoint aside and deleted part of it;
  ``record_writes``: path of a file to which every call of begin/finish_checkpoint and
      export_transformer appends ``rank=<RANK> <what> step=<N>``;
  ``nan_teacher_from``: the sCM teacher returns NaN from this (0-based) call on, on every rank;
  ``record_exit``: path of a file to which every training process appends ``rank=<RANK> exit=<CODE>``
      when its entry point ends normally (a process killed by a signal writes nothing).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch

FAULTS_ENV = "T2I_FAULTS"
MARKER_ENV = "T2I_FAULT_MARKER"
HOOKS_DIR = Path(__file__).resolve().parent / "fault_hooks"
REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Helpers for tests
# ----------------------------------------------------------------------------------------------

def scm_argv(pipe: Path, data: Path, out: Path, **flags) -> list[str]:
    """train_sCM.py flags for a tiny CPU run (32 px, batch 4, 6 steps, checkpoint every 2); override by keyword."""
    base = {"pretrained_model_name_or_path": pipe, "timestep_scale": 1000, "data_dir": data, "resolution": 32,
            "train_batch_size": 4, "max_train_steps": 6, "checkpointing_steps": 2, "output_dir": out,
            "report_to": "none", "learning_rate": 1e-4, "seed": 3}
    base.update(flags)
    argv: list[str] = []
    for key, value in base.items():
        if value is None:
            continue
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return argv


def scm_args(pipe: Path, data: Path, out: Path, **flags) -> argparse.Namespace:
    from train_sCM import parse_args

    return parse_args(scm_argv(pipe, data, out, **flags))


def scm_method(args: argparse.Namespace):
    from training.scm import SCMMethod

    return SCMMethod.from_args(args)


def read_metrics(out: Path) -> dict[int, dict]:
    """``logs/metrics.jsonl`` as {step: record}; asserts each step appears once."""
    records = [json.loads(line) for line in (Path(out) / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"duplicated steps in metrics: {steps}"
    return {r["step"]: r for r in records}


def read_events(out: Path) -> list[dict]:
    path = Path(out) / "logs" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def load_export(out: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(Path(out) / "ckpts" / f"transformer_{step}.pt", map_location="cpu", weights_only=True)["module"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def tree_digest(path: Path) -> dict[str, str]:
    """{relative file path: sha256} of every file below ``path``."""
    path = Path(path)
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def subprocess_env(faults: dict | None = None, marker: Path | None = None, **extra) -> dict:
    """Environment for a training subprocess: offline, one thread, optional fault hooks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "NUM_WORKERS": "0",
           "MASTER_PORT": str(29500 + os.getpid() % 2000)}
    for name in ("DS_FILE", "ACCELERATE_USE_CPU", FAULTS_ENV, MARKER_ENV, "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    pythonpath = [str(REPO_ROOT)]
    if faults:
        env[FAULTS_ENV] = json.dumps(faults)
        pythonpath.insert(0, str(HOOKS_DIR))
    if marker is not None:
        env[MARKER_ENV] = str(marker)
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    env.update({k: str(v) for k, v in extra.items()})
    return env


DEEPSPEED_CPU_ENV = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(REPO_ROOT / ".cache" / "torch_extensions")}


def torchrun(argv: list[str], nproc: int = 1, entry: str = "train_sCM.py", timeout: float = 600, **env):
    """``torchrun --nproc_per_node N entry argv`` in the repository (offline, one thread); asserts exit 0.
    Pass ``ACCELERATE_USE_CPU="true"`` for CPU DDP, or ``**DEEPSPEED_CPU_ENV`` for DeepSpeed on CPU."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={29500 + os.getpid() % 2000}", entry, *argv]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def wait_for(predicate, timeout: float, what: str, proc=None, interval: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{out[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def start_in_own_group(cmd: list[str], env: dict) -> subprocess.Popen:
    """Start ``cmd`` as the leader of a new process group (as a scheduler or a terminal would see it)."""
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def metric_lines(out: Path) -> int:
    path = Path(out) / "logs" / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def signal_group_after_steps(proc: subprocess.Popen, out: Path, sig: int, steps: int = 1,
                             timeout: float = 300) -> tuple[str, float]:
    """Once ``steps`` steps are logged, send ``sig`` to the whole process group of ``proc`` (``kill -SIG --
    -PGID``); returns (combined output, seconds from the signal to the exit of ``proc``)."""
    wait_for(lambda: metric_lines(out) >= steps, timeout, f"{steps} logged step(s)", proc)
    sent = time.monotonic()
    os.killpg(proc.pid, sig)
    output, _ = proc.communicate(timeout=timeout)
    return output, time.monotonic() - sent


def read_exits(path: Path) -> dict[int, int]:
    """{rank: exit status} from a ``record_exit`` file."""
    exits = {}
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        rank, code = (int(field.split("=")[1]) for field in line.split())
        exits[rank] = code
    return exits


# ----------------------------------------------------------------------------------------------
# Fault-injecting methods (in-process)
# ----------------------------------------------------------------------------------------------

class _NaNTeacher(torch.nn.Module):
    """Wraps a teacher; returns NaN on the calls listed in ``nan_calls`` (0-based), or on every call from
    ``nan_from`` on."""

    def __init__(self, teacher, nan_calls=(), nan_from: int | None = None):
        super().__init__()
        self.teacher = teacher
        self.nan_calls, self.nan_from, self.calls = set(nan_calls), nan_from, 0

    def forward(self, *args, **kwargs):
        out = self.teacher(*args, **kwargs)
        call, self.calls = self.calls, self.calls + 1
        if call in self.nan_calls or (self.nan_from is not None and call >= self.nan_from):
            out = out.clone()
            out.view(-1)[0] = float("nan")  # a single NaN, as an fp overflow in one activation would give
        return out


def recording_method(base, nan_teacher_calls=(), nan_teacher_from=None, nan_grad_calls=(), nan_loss_calls=(),
                     on_call=None):
    """Wrap an sCM-like method: optionally inject NaN teacher outputs, NaN gradients under a finite loss,
    or a NaN loss with finite gradients, and record, at every loss call, (call index, step argument, a copy
    of the student's trainable weights)."""

    class Recording(type(base)):
        def __init__(self):
            self.__dict__.update(base.__dict__)
            self.records: list[tuple[int, int, dict[str, torch.Tensor]]] = []

        def build_models(self, args, teacher, student):
            student_module, teacher_module = super().build_models(args, teacher, student)
            if nan_teacher_calls or nan_teacher_from is not None:
                teacher_module = _NaNTeacher(teacher_module, nan_teacher_calls, nan_teacher_from)
            return student_module, teacher_module

        def loss(self, student, student_unwrapped, teacher, latents, inputs, step):
            call = len(self.records)
            weights = {k: v.detach().clone() for k, v in student_unwrapped.named_parameters() if v.requires_grad}
            self.records.append((call, step, weights))
            if on_call is not None:
                on_call(call, step)
            out = super().loss(student, student_unwrapped, teacher, latents, inputs, step)
            if call in nan_grad_calls:
                # Finite value (0), infinite derivative: d/dp sqrt(|p - p|) = inf at 0, times 0 → NaN gradient.
                p = next(q for q in student_unwrapped.parameters() if q.requires_grad)
                out.loss = out.loss + 0.0 * (p - p.detach()).abs().sqrt().sum()
            if call in nan_loss_calls:
                # A non-finite constant (no gradient path): the loss is NaN, every gradient stays finite.
                out.loss = out.loss + torch.tensor(float("nan"), device=out.loss.device)
            return out

    return Recording()


# ----------------------------------------------------------------------------------------------
# Subprocess hooks (installed by tests/fault_hooks/sitecustomize.py)
# ----------------------------------------------------------------------------------------------

def _stall(where: str) -> None:
    marker = os.environ.get(MARKER_ENV)
    if marker:
        Path(marker).write_text(where)
    while True:  # until the test kills us
        time.sleep(1)


def install_from_env() -> None:
    raw = os.environ.get(FAULTS_ENV)
    if not raw:
        return
    faults = json.loads(raw)
    import training.checkpointing as ckpt
    from model.flux_io import FluxConditioner

    if faults.get("slow_step"):
        delay = float(faults["slow_step"])
        original_call = FluxConditioner.__call__

        def slow_call(self, *args, **kwargs):
            time.sleep(delay)
            return original_call(self, *args, **kwargs)

        FluxConditioner.__call__ = slow_call

    stall = faults.get("stall")
    if stall:
        step, at = int(stall["step"]), stall["at"]
        if at in ("save_state", "export"):
            real_save = torch.save
            target = f".checkpoint-{step}.tmp/optimizer.bin" if at == "save_state" else f".transformer_{step}.pt.tmp"

            def half_save(obj, f, *args, **kwargs):
                name = str(f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", ""))
                if not name.endswith(target):
                    return real_save(obj, f, *args, **kwargs)
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                handle = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
                _stall(at)

            torch.save = half_save
        elif at == "rename":
            real_finish = ckpt.finish_checkpoint

            def stalled_finish(tmp, s, *args, **kwargs):
                if s == step:
                    _stall(at)
                return real_finish(tmp, s, *args, **kwargs)

            ckpt.finish_checkpoint = stalled_finish
        elif at == "prune":
            real_rmtree = shutil.rmtree

            def partial_rmtree(path, *args, **kwargs):
                path = Path(path)
                if path.name.endswith(".old") and (path.parent / f"checkpoint-{step}").exists():
                    files = sorted(p for p in path.iterdir() if p.is_file())
                    for p in files[: len(files) // 2]:
                        p.unlink()
                    _stall(at)
                return real_rmtree(path, *args, **kwargs)

            shutil.rmtree = partial_rmtree
        else:
            raise ValueError(f"unknown stall point {at!r}")

    if faults.get("nan_teacher_from") is not None:
        from training.scm import SCMMethod

        real_build = SCMMethod.build_models
        first = int(faults["nan_teacher_from"])

        def build_with_nan_teacher(self, args, teacher, student):
            student_module, teacher_module = real_build(self, args, teacher, student)
            return student_module, _NaNTeacher(teacher_module, nan_from=first)

        SCMMethod.build_models = build_with_nan_teacher

    record = faults.get("record_writes")
    if record:
        rank = os.environ.get("RANK", "0")

        def recorder(name, fn, step_of):
            def wrapped(*args, **kwargs):
                with open(record, "a") as f:
                    f.write(f"rank={rank} {name} step={step_of(args)}\n")
                return fn(*args, **kwargs)
            return wrapped

        ckpt.begin_checkpoint = recorder("begin_checkpoint", ckpt.begin_checkpoint, lambda a: a[1])
        ckpt.finish_checkpoint = recorder("finish_checkpoint", ckpt.finish_checkpoint, lambda a: a[1])
        ckpt.export_transformer = recorder("export_transformer", ckpt.export_transformer, lambda a: a[3])

    exits = faults.get("record_exit")
    if exits:
        import training.cli as cli

        rank = os.environ.get("RANK", "0")
        real_exit = cli.exit_process

        def recording_exit(code):
            with open(exits, "a") as f:
                f.write(f"rank={rank} exit={code}\n")
            real_exit(code)

        cli.exit_process = recording_exit
