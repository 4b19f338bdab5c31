"""Helpers for GenEval's image-folder layout, shared by the code that writes and the code that reads it.

GenEval's evaluator walks ``<root>/<n>/`` for every sub-directory whose name is all digits, loads
``<root>/<n>/metadata.jsonl`` with ``json.load`` (so the file holds ONE JSON object: line ``n`` of
``evaluation_metadata.jsonl``) and scores every ``<root>/<n>/samples/<digits>.png``. Folders it does
not find are skipped without a word, which silently lowers the score; :func:`check_folder` makes
that visible before anyone runs the (GPU-only) evaluator.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Union

PathLike = Union[str, "os.PathLike[str]"]

#: File names GenEval scores inside ``samples/`` (it uses ``re.match``, i.e. a prefix match).
SAMPLE_NAME = re.compile(r"\d+\.png")
#: The metadata file name inside each prompt folder (JSON object, despite the extension).
METADATA_NAME = "metadata.jsonl"
#: Number of prompts in the official GenEval metadata.
GENEVAL_NUM_PROMPTS = 553
#: Images per prompt in GenEval's reference protocol.
GENEVAL_SAMPLES_PER_PROMPT = 4


class MetadataError(ValueError):
    """A metadata jsonl line that is not a GenEval prompt specification."""


def read_metadata(path: PathLike) -> list[dict[str, Any]]:
    """Read a GenEval metadata jsonl (one JSON object per line) and validate every line.

    Each line must be a JSON object with a non-empty string ``prompt`` and a non-empty string
    ``tag``. Empty lines are only tolerated at the end of the file (a line in the middle would
    shift every following prompt index). Errors name the file and the 1-based line number.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, start=1):
        where = f"{path}:{lineno}"
        if not line.strip():
            raise MetadataError(f"{where}: empty line inside the metadata file")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MetadataError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise MetadataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key in ("prompt", "tag"):
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                raise MetadataError(f"{where}: missing or empty {key!r}")
        rows.append(row)
    return rows


def prompt_dir(root: PathLike, index: int) -> Path:
    """Folder of prompt ``index``: ``root/<index:05d>``."""
    return Path(root) / f"{int(index):05d}"


def sample_path(root: PathLike, index: int, k: int) -> Path:
    """Path of sample ``k`` of prompt ``index``: ``root/<index:05d>/samples/<k:04d>.png``."""
    return prompt_dir(root, index) / "samples" / f"{int(k):04d}.png"


def write_prompt_metadata(root: PathLike, index: int, metadata: dict[str, Any]) -> Path:
    """Create ``root/<index:05d>/samples/`` and write the prompt's ``metadata.jsonl`` (one object)."""
    folder = prompt_dir(root, index)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    target = folder / METADATA_NAME
    target.write_text(json.dumps(metadata) + "\n", encoding="utf-8")
    return target


def _sample_files(samples: Path) -> list[str]:
    return sorted(
        name for name in os.listdir(samples)
        if SAMPLE_NAME.match(name) and (samples / name).is_file()
    )


def check_folder(
    root: PathLike,
    metadata: Iterable[dict[str, Any]],
    n_samples: int = GENEVAL_SAMPLES_PER_PROMPT,
) -> list[str]:
    """List everything that keeps ``root`` from being a complete GenEval folder for ``metadata``.

    Reports, one human-readable string each: a missing root, missing prompt folders, missing or
    unreadable ``metadata.jsonl``, a ``metadata.jsonl`` that differs from the expected entry,
    prompt folders with fewer than ``n_samples`` scoreable ``<digits>.png`` files (naming the
    missing ``<k:04d>.png``), and digit-named folders beyond the metadata (GenEval would score
    them too). An empty list means the folder is complete.
    """
    root = Path(root)
    metadata = list(metadata)
    if not root.is_dir():
        return [f"{root}: image folder does not exist"]
    problems: list[str] = []
    for index, expected in enumerate(metadata):
        folder = prompt_dir(root, index)
        name = folder.name
        if not folder.is_dir():
            problems.append(f"{name}: prompt folder missing ({expected.get('prompt')!r})")
            continue
        meta_file = folder / METADATA_NAME
        if not meta_file.is_file():
            problems.append(f"{name}/{METADATA_NAME}: missing")
        else:
            try:
                with open(meta_file, encoding="utf-8") as fh:
                    found = json.load(fh)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                problems.append(f"{name}/{METADATA_NAME}: not a single JSON object ({exc})")
            else:
                if found != expected:
                    problems.append(
                        f"{name}/{METADATA_NAME}: differs from metadata line {index + 1} "
                        f"(found prompt {found.get('prompt') if isinstance(found, dict) else found!r}, "
                        f"expected {expected.get('prompt')!r})"
                    )
        samples = folder / "samples"
        if not samples.is_dir():
            problems.append(f"{name}/samples: missing (0 of {n_samples} samples)")
            continue
        present = _sample_files(samples)
        if len(present) < n_samples:
            missing = [f"{k:04d}.png" for k in range(n_samples) if f"{k:04d}.png" not in present]
            problems.append(
                f"{name}/samples: {len(present)} of {n_samples} samples"
                + (f" (missing {', '.join(missing)})" if missing else "")
            )
    extra = sorted(
        entry for entry in os.listdir(root)
        if entry.isdigit() and (root / entry).is_dir() and int(entry) >= len(metadata)
    )
    for entry in extra:
        problems.append(f"{entry}: folder beyond the {len(metadata)} metadata entries (GenEval scores it too)")
    return problems
