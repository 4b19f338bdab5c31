"""Write GenEval image folders with any text-to-image sampler: deterministic, resumable, multi-rank.

Layout (see ``evaluation/geneval_layout.py``): ``OUT/<index:05d>/metadata.jsonl`` (that prompt's
metadata line, one JSON object), ``OUT/<index:05d>/samples/<k:04d>.png`` for k < n_samples, optional
``OUT/<index:05d>/grid.png``, and ``OUT/generation_config.json`` (the settings the folder was made
with; a rerun with other settings is refused instead of mixing two models' images).

Determinism.  Image (index, k) gets its own ``torch.Generator`` seeded with
``image_seed(seed, index, k)`` (numpy ``SeedSequence`` mixing of the three integers), which the
sampler uses for all of that image's randomness (initial noise and any re-injected noise).  Batches
are formed the same way whatever the world size or what is already on disk: prompts are cut into
fixed groups of P = max(1, batch_size // n_samples) consecutive prompts, a group's images
(prompt-major) into batches of ``batch_size``; group g belongs to rank g mod world_size.  So every
image is computed by the same batch with the same noise in every run — reruns and 1 vs N ranks give
identical files (batched kernels can otherwise change the last bits).

Resuming.  A batch runs only when one of its images is missing, and only missing files are written;
complete prompts are never touched (mtimes unchanged).  Every file is written to a temporary name in
the same folder and renamed into place (``os.replace``), so an interruption never leaves a truncated
PNG or metadata file under a name GenEval reads.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from evaluation.geneval_layout import METADATA_NAME, prompt_dir, sample_path

#: ``sampler(prompts, generators) -> images``: one prompt and one generator per image, PIL images back.
Sampler = Callable[[list[str], list[torch.Generator]], Sequence[Image.Image]]
RUN_CONFIG_NAME = "generation_config.json"
GRID_NAME = "grid.png"


def image_seed(seed: int, index: int, k: int) -> int:
    """64-bit seed of image k of prompt ``index`` (independent streams via numpy's SeedSequence)."""
    if min(seed, index, k) < 0:
        raise ValueError(f"seed, prompt index and sample index must be >= 0, got {seed}, {index}, {k}")
    hi, lo = np.random.SeedSequence([seed, index, k]).generate_state(2, dtype=np.uint32)
    return (int(hi) << 32) | int(lo)


def image_generators(seed: int, images: Sequence[tuple[int, int]]) -> list[torch.Generator]:
    """One CPU generator per (index, k); CPU so the noise is the same on every device."""
    return [torch.Generator("cpu").manual_seed(image_seed(seed, i, k)) for i, k in images]


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when not launched by it."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc})") from exc
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid RANK={rank} for WORLD_SIZE={world}")
    return rank, world, local


def plan_groups(num_prompts: int, n_samples: int, batch_size: int) -> list[list[list[tuple[int, int]]]]:
    """groups → batches → images (index, k); independent of world size and of files on disk."""
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1, got {n_samples} and {batch_size}")
    per_group = max(1, batch_size // n_samples)
    groups = []
    for start in range(0, num_prompts, per_group):
        images = [(i, k) for i in range(start, min(start + per_group, num_prompts)) for k in range(n_samples)]
        groups.append([images[b:b + batch_size] for b in range(0, len(images), batch_size)])
    return groups


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_png_atomic(image: Image.Image, path: str | os.PathLike) -> None:
    """Save ``image`` as PNG under a hidden temporary name, then rename it to ``path``."""
    path = Path(path)
    # Hidden temp name: GenEval's `\\d+\\.png` never matches it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_grid(images: Sequence[Image.Image]) -> Image.Image:
    """Tile images row-major on a ⌈√n⌉-column grid."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for n, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((n % cols) * w, (n // cols) * h))
    return grid


def metadata_conflicts(root: str | os.PathLike, rows: Sequence[dict]) -> list[str]:
    """Prompt folders in ``root`` whose metadata.jsonl holds another prompt than ``rows`` says."""
    problems = []
    for index, row in enumerate(rows):
        meta = prompt_dir(root, index) / METADATA_NAME
        if meta.exists() and _read_json(meta) != row:
            problems.append(f"{meta} does not hold metadata line {index + 1} ({row.get('prompt')!r})")
    return problems


def check_run_config(root: str | os.PathLike, config: dict) -> None:
    """Refuse to add images to a folder generated with other settings (ValueError naming the differences)."""
    saved = _read_json(Path(root) / RUN_CONFIG_NAME)
    if not isinstance(saved, dict):
        return
    diffs = [f"{k}: folder {saved.get(k)!r} vs now {v!r}" for k, v in config.items() if saved.get(k) != v]
    if diffs:
        raise ValueError(f"{root} holds images made with other settings ({'; '.join(diffs)}). "
                         "Use a new --output_dir, or the same settings to resume.")


@dataclass
class GenerationReport:
    """What one rank did."""

    rank: int
    world_size: int
    prompts: int  # prompts assigned to this rank
    images_written: int
    images_skipped: int  # already on disk
    seconds: float  # wall time of sampling + writing (model loading excluded)
    nfe: int | None = None  # transformer evaluations per image

    @property
    def images_per_second(self) -> float:
        return self.images_written / self.seconds if self.seconds > 0 else float("nan")

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.images_written if self.images_written else float("nan")

    def summary(self) -> str:
        nfe = f", NFE {self.nfe}" if self.nfe is not None else ""
        if not self.images_written:
            return (f"[rank {self.rank}/{self.world_size}] nothing to do: all {self.images_skipped} images of its "
                    f"{self.prompts} prompts are present")
        return (f"[rank {self.rank}/{self.world_size}] {self.images_written} images written, {self.images_skipped} already "
                f"present, {self.prompts} prompts, {self.seconds:.2f} s: {self.images_per_second:.3f} images/s, "
                f"{self.seconds_per_image:.4f} s/image{nfe}")


def generate_folder(rows: Sequence[dict], root: str | os.PathLike, sampler: Sampler, *, n_samples: int = 4,
                    batch_size: int = 4, seed: int = 42, rank: int = 0, world_size: int = 1, grid: bool = False,
                    run_config: dict | None = None, nfe: int | None = None, progress: bool = True) -> GenerationReport:
    """Fill ``root`` with this rank's share of the GenEval folder for ``rows`` (see module doc).

    Every check that can fail on user input (settings differing from ``generation_config.json``,
    prompt folders holding other prompts) runs before anything is created.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    root = Path(root)
    groups = plan_groups(len(rows), n_samples, batch_size)
    if root.exists():
        conflicts = metadata_conflicts(root, rows)
        if conflicts:
            raise ValueError(f"{root} was generated for other prompts ({conflicts[0]}"
                             f"{f' and {len(conflicts) - 1} more' if len(conflicts) > 1 else ''}). Use a new --output_dir.")
        if run_config is not None:
            check_run_config(root, run_config)
    root.mkdir(parents=True, exist_ok=True)
    if run_config is not None and not (root / RUN_CONFIG_NAME).exists():
        _atomic_write_text(root / RUN_CONFIG_NAME, json.dumps(run_config, indent=2, sort_keys=True) + "\n")

    mine = [g for n, g in enumerate(groups) if n % world_size == rank]
    todo = [[[(i, k) for i, k in batch if not sample_path(root, i, k).exists()] for batch in g] for g in mine]
    missing = sum(len(b) for g in todo for b in g)
    total = sum(len(b) for g in mine for b in g)
    report = GenerationReport(rank, world_size, prompts=len({i for g in mine for b in g for i, _ in b}),
                              images_written=0, images_skipped=total - missing, seconds=0.0, nfe=nfe)
    start = time.perf_counter()
    bar = tqdm(total=missing, unit="img", desc=f"rank {rank}/{world_size}", disable=not progress or missing == 0)
    for group, group_todo in zip(mine, todo):
        indices = sorted({i for batch in group for i, _ in batch})
        for i in indices:
            folder = prompt_dir(root, i)
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            if _read_json(folder / METADATA_NAME) != rows[i]:
                _atomic_write_text(folder / METADATA_NAME, json.dumps(rows[i]) + "\n")
        for batch, needed in zip(group, group_todo):
            if not needed:
                continue
            # The whole batch is recomputed even if only some images are missing: same batch, same numbers.
            images = sampler([rows[i]["prompt"] for i, _ in batch], image_generators(seed, batch))
            if len(images) != len(batch):
                raise RuntimeError(f"sampler returned {len(images)} images for {len(batch)} prompts")
            for (i, k), image in zip(batch, images):
                if (i, k) in needed:
                    save_png_atomic(image, sample_path(root, i, k))
                    report.images_written += 1
            bar.update(len(needed))
        if grid:
            for i in indices:
                target = prompt_dir(root, i) / GRID_NAME
                if not target.exists():
                    samples = [Image.open(sample_path(root, i, k)) for k in range(n_samples)]
                    save_png_atomic(make_grid(samples), target)
    bar.close()
    report.seconds = time.perf_counter() - start
    return report
