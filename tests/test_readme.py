"""The README cannot drift from the code: its commands, flags, paths and snippets are checked here.

Conventions for whoever edits README.md (new sections need nothing else):

* Fenced ```bash / ```python blocks hold commands and snippets. A block whose first line is a
  ``# needs: gpu`` / ``# needs: hub`` / ``# needs: hub, gpu`` / ``# needs: slow`` comment is never run here;
  everything else about it is still checked.
* Every command of every block (``python X.py``, ``python -m pkg.module``, ``bash script/X.sh``, also
  ``python -c '...'``) must name an existing entry point, and every ``--flag`` in it must be one that
  entry point's ``--help`` lists (for ``script/*.sh``: the Python entry point the script launches).
  ``...`` stands for "the flags of the line above" and is allowed anywhere.
* ``accelerate launch`` / ``torchrun`` flags (before the script) are checked against those launchers' parsers.
* Inline code spans: a ``--flag`` in a span that names an entry point is checked against that entry
  point; any other ``--flag`` must exist in at least one entry point (or be SLURM's ``--signal``), except a
  span written right after "release's" or "no" (``the release's `--optimizer prodigy` ``, ``the CLIs have
  no `--compile` ``), which names a flag that is not ours.
* The Layout table: every backticked path in its first column exists (globs: at least one match).
* Run on the tiny CPU fixtures: every block without a ``# needs:`` line that holds only cheap commands
  (samplers, exporter, summariser, curves; listed in ``CHEAP``) and every ```python block. The
  README's placeholders are substituted (``Freepik/flux.1-lite-8B`` → the tiny pipeline,
  ``work_dirs/sCM`` → a tiny run folder, ...) and samplers get a size override (64 px, 1 prompt,
  1 image). Commands with ``...`` are partial and only checked. Expensive commands (training,
  quick start, benchmark) are checked, not run.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
NEEDS = re.compile(r"^#\s*needs:\s*(.+)$")
#: Entry points cheap enough to run on the tiny fixtures.
CHEAP = {"test_sCM.py", "test_meanflow.py", "test_flux8b.py", "export_diffusers.py", "evaluation.summarize_geneval",
         "training.plot_metrics"}
SAMPLERS = {"test_sCM.py", "test_meanflow.py", "test_flux8b.py"}
#: Flags of SLURM's sbatch/srun that the README's long-run section names.
SLURM_FLAGS = frozenset({"--signal"})
SMALL_SAMPLING = ["--resolution", "64", "--max_sequence_length", "32", "--max_prompts", "1", "--n_samples", "1",
                  "--no_progress"]


# --------------------------------------------------------------------------------------------
# Reading the README


def code_blocks(text: str) -> list[dict]:
    """Fenced blocks: {"lang", "lines", "needs" (set), "start" (line number)}."""
    blocks, current = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        fence = re.match(r"^```(\w*)\s*$", line.strip())
        if fence and current is None:
            current = {"lang": fence.group(1), "lines": [], "start": number}
        elif line.strip() == "```" and current is not None:
            first = current["lines"][0].strip() if current["lines"] else ""
            needs = NEEDS.match(first)
            current["needs"] = {n.strip() for n in needs.group(1).split(",")} if needs else set()
            blocks.append(current)
            current = None
        elif current is not None:
            current["lines"].append(line)
    return blocks


def commands(block: dict) -> list[str]:
    """Shell commands of a bash block: continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in block["lines"]:
        line = raw.rstrip()
        if pending:
            line = pending + " " + line.strip()
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        out.append(line)
    if pending:
        out.append(pending)
    result = []
    for line in out:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # a multi-line python -c '...' string: join the block's lines below
            words = None
        if words is None or words:
            result.append(line)
    return _join_quoted(result)


def _join_quoted(lines: list[str]) -> list[str]:
    """Re-join lines that belong to one quoted argument (python -c '...' over several lines)."""
    joined, buffer = [], ""
    for line in lines:
        buffer = f"{buffer}\n{line}" if buffer else line
        try:
            shlex.split(buffer, comments=True)
        except ValueError:
            continue
        joined.append(buffer)
        buffer = ""
    return joined + ([buffer] if buffer else [])


@lru_cache(maxsize=None)
def launcher_flags() -> dict[str, frozenset[str]]:
    """Flags of the launchers the README names (`accelerate launch`, `torchrun`), from their own parsers."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    return {name: frozenset(s for a in parser._actions for s in a.option_strings)
            for name, parser in (("accelerate", launch_command_parser()), ("torchrun", get_args_parser()))}


def entry_of(words: list[str]) -> str | None:
    """The entry point a command runs: 'train_sCM.py', 'evaluation.summarize_geneval', 'script/x.sh', or None."""
    if words and words[0] in ("accelerate", "torchrun"):  # `accelerate launch [flags] X.py ...`
        script = next((w for w in words if w.endswith(".py")), None)
        return script or words[0]
    for i, word in enumerate(words):
        if word in ("python", "python3") and i + 1 < len(words):
            nxt = words[i + 1]
            if nxt == "-m" and i + 2 < len(words):
                return words[i + 2]
            if nxt == "-c":
                return "-c"
            return nxt
        if word == "bash" and i + 1 < len(words):
            return words[i + 1]
    return None


def flags_of(words: list[str]) -> list[str]:
    return sorted({w.split("=")[0] for w in words if re.match(r"^--[a-z][a-z0-9_-]*", w)})


# --------------------------------------------------------------------------------------------
# What the code offers


@lru_cache(maxsize=None)
def _cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", REPO_ROOT / "docs" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=None)
def entry_flags() -> dict[str, frozenset[str]]:
    """{'train_sCM.py' / 'evaluation.summarize_geneval': flags of its --help} for every entry point."""
    ref = _cli_reference()
    out = {}
    for command, kind, target in ref.entry_points():
        name = Path(target).relative_to(REPO_ROOT).as_posix() if kind == "path" else target
        parser = ref.capture_parser(kind, target, name)
        flags = {s for a in parser._actions for s in a.option_strings} if parser is not None else set()
        out[name] = frozenset(flags)
    return out


def script_entry(script: str) -> str | None:
    """The Python entry point a launch script runs (following one level of script → script)."""
    text = (REPO_ROOT / script).read_text()
    for pattern in (r'_launch\.sh"\s+(\S+\.py)', r"\bENTRY=(\S+\.py)", r'geneval_launch\s+"[^"]*"\s+(\S+\.py)',
                    r"-m\s+([a-z_]+(?:\.[a-z_]+)+)"):
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    match = re.search(r'script/(\w+\.sh)"', text)
    return script_entry(f"script/{match.group(1)}") if match else None


def check_command(words: list[str], where: str) -> list[str]:
    """Problems of one command: a missing entry point, or flags its --help does not list."""
    entry = entry_of(words)
    if entry is None or entry == "-c":
        return []
    if words[0] in launcher_flags():  # the launcher's own flags come before the script
        split = words.index(entry) if entry.endswith(".py") else len(words)
        known = launcher_flags()[words[0]]
        bad = [f"{where}: {words[0]} has no {flag}" for flag in flags_of(words[:split]) if flag not in known]
        return bad + (check_command(["python", *words[split:]], where) if split < len(words) else [])
    if entry.endswith(".sh"):
        if not (REPO_ROOT / entry).is_file():
            return [f"{where}: {entry} does not exist"]
        target = script_entry(entry)
    else:
        target = entry
    if target is None:
        return [] if not flags_of(words) else [f"{where}: cannot tell which entry point {entry} runs"]
    if target in launcher_flags():
        return []
    if any(c in target for c in "*?["):  # `python train_*.py`: each match must exist and take the flags
        matches = sorted(Path(m).relative_to(REPO_ROOT).as_posix() for m in glob.glob(str(REPO_ROOT / target)))
        if not matches:
            return [f"{where}: nothing matches {target}"]
        return [p for m in matches for p in check_command([w if w != target else m for w in words], where)]
    known = flags_for(target)
    if known is None:
        return [f"{where}: {target} is not an entry point (no such file/module with a __main__ block)"]
    return [f"{where}: {target} has no {flag} (see its --help)" for flag in flags_of(words) if flag not in known]


def flags_for(target: str) -> frozenset[str] | None:
    """Flags of an entry point: the repository's (docs/cli.md's list), or any other script with a __main__ block."""
    if target in entry_flags():
        return entry_flags()[target]
    path = REPO_ROOT / target
    if not target.endswith(".py") and (REPO_ROOT / (target.replace(".", "/") + ".py")).is_file():
        path = REPO_ROOT / (target.replace(".", "/") + ".py")  # python -m benchmarks.x == python benchmarks/x.py
    if not (path.suffix == ".py" and path.is_file() and "__main__" in path.read_text()):
        return None
    parser = _cli_reference().capture_parser("path", str(path), path.name)
    return frozenset(s for a in parser._actions for s in a.option_strings) if parser is not None else frozenset()


# --------------------------------------------------------------------------------------------
# Static checks


def test_every_command_names_an_entry_point_and_its_flags():
    problems = []
    for block in code_blocks(README.read_text()):
        if block["lang"] not in ("bash", "sh", ""):
            continue
        for command in commands(block):
            words = shlex.split(command, comments=True)
            problems += check_command(words, f"README.md:{block['start']} `{command.strip()[:60]}`")
    assert not problems, "\n".join(problems)


def _paragraph_spans(text: str) -> list[list[str]]:
    """Inline code spans, grouped by paragraph (fenced blocks left out)."""
    out, inside = [], False
    for paragraph in re.split(r"\n\s*\n", text):
        if paragraph.lstrip().startswith("```") or inside:
            inside = paragraph.count("```") % 2 == 1 and not inside or (inside and paragraph.count("```") % 2 == 0)
            continue
        out.append(re.findall(r"`([^`\n]+)`", paragraph))
    return out


def test_inline_flags_exist():
    text = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)
    # Flags that are not ours, named as such: the original release's, ones we do not have, SLURM's.
    released = set(re.findall(r"(?:release's|\bno) `([^`]+)`", text))
    all_flags_external = SLURM_FLAGS
    all_flags = frozenset().union(*entry_flags().values(), *launcher_flags().values(), all_flags_external)
    problems = []
    for spans in _paragraph_spans(text):
        for span in spans:
            if span in released:
                continue
            try:
                words = shlex.split(span)
            except ValueError:
                words = span.split()
            if entry_of(words) is not None:
                problems += check_command(words, f"README.md `{span[:60]}`")
                continue
            for flag in flags_of(words):
                if flag not in all_flags:
                    problems.append(f"README.md `{span[:60]}`: no entry point has {flag}")
    assert not problems, "\n".join(problems)


def test_layout_table_matches_the_tree():
    text = README.read_text()
    section = text.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and not set(line) <= set("|- ")]
    paths = [p for row in rows[1:] for p in re.findall(r"`([^`]+)`", row.split("|")[1])]
    assert len(paths) >= 10, paths
    missing = [p for p in paths if not glob.glob(str(REPO_ROOT / p))]
    assert not missing, f"the Layout table names paths that do not exist: {missing}"


def test_markers_are_known():
    for block in code_blocks(README.read_text()):
        assert block["needs"] <= {"gpu", "hub", "slow"}, (block["start"], block["needs"])


# --------------------------------------------------------------------------------------------
# Running the cheap blocks on the tiny fixtures


@pytest.fixture(scope="module")
def fixtures(tiny_assets, tmp_path_factory) -> dict[str, str]:
    """README placeholder → tiny fixture path."""
    from model.loading import load_flux_transformer
    from training.checkpointing import export_transformer
    import torch

    pipe, _ = tiny_assets
    root = tmp_path_factory.mktemp("readme")
    tf = load_flux_transformer(str(pipe), 1.0)
    state = dict(tf.state_dict())
    state["logvar_linear.weight"], state["logvar_linear.bias"] = torch.randn(1, tf.inner_dim), torch.zeros(1)
    scm, mf = root / "work_dirs" / "sCM", root / "work_dirs" / "meanflow"
    export_transformer(scm / "ckpts" / "transformer_3000.pt", state, dict(tf.config), 3000)
    tf.enable_interval_embedding("copy")
    export_transformer(mf / "ckpts" / "transformer_3000.pt", tf.state_dict(), dict(tf.config), 3000)
    for run, key in ((scm, "loss_sCM"), (mf, "loss")):
        (run / "logs").mkdir()
        (run / "logs" / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, key: 1.0 / s, "grad_norm": 0.5, "g_norm": 1.0}) + "\n" for s in range(1, 6)))
    meta = root / "evaluation_metadata.jsonl"
    meta.write_text("".join((REPO_ROOT / "evaluation" / "evaluation_metadata.jsonl").read_text().splitlines(True)[:2]))
    results = root / "results.jsonl"
    results.write_text("".join(json.dumps({"tag": json.loads(line)["tag"], "correct": True, "metadata": line.strip()})
                               + "\n" for line in meta.read_text().splitlines()))
    return {"Freepik/flux.1-lite-8B": str(pipe), "work_dirs/sCM": str(scm), "work_dirs/meanflow": str(mf),
            "evaluation/evaluation_metadata.jsonl": str(meta), "results.jsonl": str(results),
            "transformer_3000.pt": str(scm / "ckpts" / "transformer_3000.pt"), "_root": str(root)}


def _substitute(text: str, fixtures: dict[str, str]) -> str:
    for placeholder in sorted((k for k in fixtures if not k.startswith("_")), key=len, reverse=True):
        text = re.sub(rf"(?<![\w/]){re.escape(placeholder)}", fixtures[placeholder], text)
    return text


def _runnable() -> list[tuple[str, str]]:
    """(id, command) of every cheap, complete command outside # needs: blocks, and every python block."""
    out = []
    for block in code_blocks(README.read_text()):
        if block["needs"]:
            continue
        if block["lang"] == "python":
            out.append((f"README.md:{block['start']}", "\n".join(block["lines"])))
            continue
        for command in commands(block):
            words = shlex.split(command, comments=True)
            entry = entry_of(words)
            if entry in CHEAP and "..." not in words:
                out.append((f"README.md:{block['start']} {entry}", command))
    return out


def _params():
    """Sampler and exporter runs load a pipeline (tens of seconds each here): slow; the rest run by default."""
    out = []
    for where, command in _runnable():
        entry = entry_of(shlex.split(command, comments=True)) if "\n" not in command else "python"
        slow = entry in SAMPLERS or entry in ("export_diffusers.py", "python")
        out.append(pytest.param(where, command, id=where, marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.mark.parametrize("where,command", _params())
def test_cheap_readme_commands_run_on_the_tiny_fixtures(fixtures, tmp_path, where, command):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if "\n" in command and not command.lstrip().startswith(("python", "bash")):  # a ```python block
        proc = subprocess.run([sys.executable, "-c", _substitute(command, fixtures)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{where}\n{proc.stderr[-3000:]}"
        return
    words = shlex.split(_substitute(command, fixtures), comments=True)
    start = words.index(next(w for w in words if w in ("python", "python3")))
    words = [sys.executable, *words[start + 1:]]
    if words[1].endswith(".py"):
        words[1] = str(REPO_ROOT / words[1])  # README commands start in the repo; outputs stay in tmp_path
    if entry_of(shlex.split(command, comments=True)) in SAMPLERS:
        words += SMALL_SAMPLING
    proc = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{where}: {' '.join(words)}\n{proc.stderr[-3000:]}"
