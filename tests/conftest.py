"""Shared fixtures: a tiny FLUX pipeline and dataset built offline once per test session."""
from __future__ import annotations

import os

# Everything runs offline and single-threaded (2-core machines get erratic with >1 torch thread).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny FLUX pipeline folder, tiny parquet dataset folder), built once per session."""
    from data.tiny_flux import ensure_tiny_assets

    return ensure_tiny_assets(tmp_path_factory.mktemp("tiny"))
