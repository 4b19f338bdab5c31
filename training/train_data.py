"""The training data stream: a dataset read in a resumable, rank-sharded order.

:class:`TrainData` is what the loop consumes: ``batches(state)`` yields this rank's micro-batches from
the position saved in the :class:`~training.core.TrainState` (epoch, micro-batches consumed), and
``substitute(batch)`` replaces a micro-batch whose samples are all unreadable.  Another data source
(e.g. streaming) only has to offer the same three members (``batches``, ``substitute``, ``__len__``).
"""
from __future__ import annotations

import argparse
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from data.dataset import Text2ImageDataset, image_root, load_hf_dataset
from training.common import TrainingError
from training.stop import ignore_stop_signals, start_iterator


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


def load_train_dataset(args: argparse.Namespace) -> Text2ImageDataset:
    """The flags' dataset, checked readable (fails in seconds, before any model is loaded)."""
    hf_dataset = load_hf_dataset(args.dataset_name, args.data_files, args.data_dir, cache_dir=args.cache_dir)
    limit = getattr(args, "max_train_samples", None)
    if limit is not None and limit < len(hf_dataset):
        hf_dataset = hf_dataset.select(range(limit))  # the first rows, as --streaming takes them
    dataset = Text2ImageDataset(hf_dataset, args.resolution, args.image_column, args.caption_column,
                                center_crop=args.center_crop, random_flip=args.random_flip,
                                data_dir=image_root(args.dataset_name, args.data_files, args.data_dir),
                                seed=args.seed)
    check_dataset_readable(dataset)
    return dataset


class TrainData:
    """``dataset`` read by :class:`ResumableSampler`; crops/flips seeded by (seed, epoch, index)."""

    def __init__(self, dataset: Text2ImageDataset, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int = 0):
        self.dataset = dataset
        self.sampler = ResumableSampler(len(dataset), batch_size, rank, world_size, seed)
        # Its own generator: creating an iterator never consumes global random numbers (exact resume).
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, collate_fn=dataset.collate_fn,
                                 num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
                                 worker_init_fn=ignore_stop_signals)  # a worker never decides a stop

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, epoch: int, start_batch: int) -> Iterator[dict]:
        """This rank's micro-batches of ``epoch`` after the first ``start_batch`` ones."""
        self.sampler.set_position(epoch, start_batch)
        self.dataset.set_epoch(epoch)
        return start_iterator(self.loader)  # workers start with the stop signals blocked (training/stop.py)

    def substitute(self, batch: dict, max_tries: int = 64) -> dict:
        """A one-sample batch replacing a micro-batch whose samples are all unreadable.

        Every rank must run a forward/backward on every micro-batch (DDP and DeepSpeed synchronise
        gradients inside backward), so an empty micro-batch cannot simply be skipped.  The substitute
        is the next readable sample after the first bad index: deterministic, hence resumable.
        """
        n = len(self.dataset)
        start = batch["bad_indices"][0]
        for k in range(1, min(n, max_tries) + 1):
            j = (start + k) % n
            sample = self.dataset[j]
            if "bad_reason" not in sample:
                out = self.dataset.collate_fn([sample])
                out["bad_indices"], out["bad_reasons"] = batch["bad_indices"], batch["bad_reasons"]
                return out
        raise TrainingError(f"samples {batch['bad_indices']} and the {min(n, max_tries)} following ones are all "
                            "unreadable; check the dataset.")
