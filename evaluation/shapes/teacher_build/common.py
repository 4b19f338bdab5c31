"""Small helpers shared by the teacher build's stages: constants, progress bars, image conversion, LR schedule."""
from __future__ import annotations

import io
import math
import os
from typing import Sequence, Union

import numpy as np

BUILD_INFO_NAME = "teacher_build_info.json"
#: The prompt that stands for "no caption" (the MeanFlow trainer's unconditional prompt).
UNCONDITIONAL_PROMPT = " "
PathLike = Union[str, "os.PathLike[str]"]


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar (disabled unless ``enabled``), refreshed at most once a second."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, mininterval=1.0)


def images_from_rows(rows: Sequence[dict]) -> np.ndarray:
    """uint8 array [N, H, W, 3] of the PNG bytes in ``rows`` (``generate_examples`` format)."""
    from PIL import Image

    out = None
    for i, row in enumerate(rows):
        with Image.open(io.BytesIO(row["image"]["bytes"])) as im:
            arr = np.asarray(im.convert("RGB"))
        if out is None:
            out = np.empty((len(rows),) + arr.shape, dtype=np.uint8)
        out[i] = arr
    return out


def to_pixels(images: np.ndarray):
    """uint8 [B, H, W, 3] → float32 tensor [B, 3, H, W] in [−1, 1] (the trainers' normalisation)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def warmup_cosine_lr(step: int, total: int, warmup: int, peak: float, min_ratio: float) -> float:
    """LR of 0-based ``step``: linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay
    lr = peak·(min_ratio + (1 − min_ratio)·½(1 + cos(π·p))), p = (step − warmup)/(total − warmup)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
