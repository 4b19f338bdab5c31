"""Stage runner of the shapes benchmark: each stage is a subprocess of the command a user would type, its
output teed (progress bars included, repeated third-party notices shown once) to the console and
``OUT/logs/<stage>.log``; a stage already finished with the same command, for the same teacher, is skipped."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]


class BenchmarkError(RuntimeError):
    """A stage failed; the message names the command and where its log is."""


@dataclass
class CommandRecord:
    stage: str
    command: str
    seconds: float
    returncode: int
    log: str
    reused: bool = False


class NoticeFilter:
    """Console filter for the stages' output: a third-party notice (a whole line that reads as a warning)
    is shown the first time only; every later copy is dropped from the console (the stage logs keep
    everything). Without it, each of the ~28 CLI processes repeats the same import-time notices."""

    MARKERS = (b"warning", b"[transformers]", b"futurewarning", b"userwarning", b"deprecat")

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self.pending = b""

    def _keep(self, line: bytes) -> bool:
        text = line.strip()
        if not any(m in text.lower() for m in self.MARKERS):
            return True
        # a notice is identified by its text without timestamps/paths that vary between processes
        key = text.split(b"]", 1)[-1] if text.startswith(b"[20") else text
        if key in self.seen:
            return False
        self.seen.add(key)
        return True

    def filter(self, chunk: bytes) -> bytes:
        """Bytes of ``chunk`` to show now: complete lines that pass, then any progress-bar remainder."""
        data = self.pending + chunk
        out = []
        while b"\n" in data:
            line, data = data.split(b"\n", 1)
            if self._keep(line):
                out.append(line + b"\n")
        if b"\r" in data:  # a progress bar redrawing its line: show it now, it is never a notice
            out.append(data)
            data = b""
        self.pending = data
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest if rest and self._keep(rest) else b""


class Runner:
    """Runs stage commands as subprocesses, tees their output (progress bars included) to the
    console and ``OUT/logs/<stage>.log``, and skips stages already finished with the same command."""

    def __init__(self, out: Path, threads: int, fresh: bool = False, echo: bool = True, context: str = ""):
        self.out = out
        self.fresh = fresh
        #: Recorded with every finished stage; a different context (e.g. another teacher) reruns it.
        self.context = context
        self.echo = echo
        self.records: list[CommandRecord] = []
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "stages").mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                         "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
                         "PYTHONUNBUFFERED": "1"})
        self.env.pop("WORLD_SIZE", None)
        self.console = NoticeFilter()

    def _stamp(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def run(self, stage: str, argv: Sequence[str], expect: Sequence[Path] = ()) -> CommandRecord:
        """Run ``argv`` (from the repository root) unless the same command already finished and
        every path in ``expect`` exists."""
        command = " ".join(shlex.quote(str(a)) for a in argv)
        stamp = self._stamp(stage)
        log_path = self.out / "logs" / f"{stage}.log"
        if not self.fresh and stamp.is_file() and all(Path(p).exists() for p in expect):
            done = json.loads(stamp.read_text(encoding="utf-8"))
            if done.get("command") == command and done.get("context", "") == self.context:
                record = CommandRecord(stage, command, done.get("seconds", 0.0), 0, str(log_path), reused=True)
                self.records.append(record)
                self._log_line(record)
                self._say(f"[benchmark] {stage}: reusing the finished run ({done.get('seconds', 0):.0f} s)")
                return record
        stamp.unlink(missing_ok=True)
        self._say(f"[benchmark] {stage}: {command}")
        start = time.perf_counter()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([str(a) for a in argv], cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            assert proc.stdout is not None
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                log.write(chunk)
                if self.echo:
                    sys.stderr.buffer.write(self.console.filter(chunk))
                    sys.stderr.flush()
            if self.echo:
                sys.stderr.buffer.write(self.console.flush())
            returncode = proc.wait()
        seconds = time.perf_counter() - start
        record = CommandRecord(stage, command, seconds, returncode, str(log_path))
        self.records.append(record)
        self._log_line(record)
        if returncode != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
            raise BenchmarkError(f"stage {stage} failed (exit {returncode}) after {seconds:.0f} s; log {log_path}; "
                                 f"last lines: {' | '.join(tail)}")
        missing = [str(p) for p in expect if not Path(p).exists()]
        if missing:
            raise BenchmarkError(f"stage {stage} finished but did not write {', '.join(missing)} (log {log_path})")
        stamp.write_text(json.dumps({"command": command, "seconds": seconds, "context": self.context}) + "\n",
                         encoding="utf-8")
        return record

    def _say(self, text: str) -> None:
        if self.echo:
            print(text, file=sys.stderr, flush=True)

    def _log_line(self, record: CommandRecord) -> None:
        status = "reused" if record.reused else f"exit {record.returncode}"
        with open(self.out / "commands.log", "a", encoding="utf-8") as fh:
            fh.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {record.stage}: {record.seconds:.1f} s, {status}\n"
                     f"{record.command}\n")
