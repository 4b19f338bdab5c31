"""The training loop's data source for ``--streaming`` (the map-style one is ``training/train_data.py``).

Same members as :class:`~training.train_data.TrainData` (``batches``, ``substitute``, ``__len__``), over a
:class:`~data.streaming.StreamingText2ImageSource`.  Two things differ from a map-style dataset:

* ranks may hold different numbers of rows (whole shards per rank), so before every micro-batch all ranks
  agree (one all-reduce of "I have a full batch") and the epoch ends for all at the first rank that has
  none: every rank runs the same number of forward/backward passes, as DDP and DeepSpeed require.  The
  ragged end of an epoch is dropped, as the map-style sampler drops its last partial batch;
* the stream's length is unknown: ``len()``, the base of ``--max_bad_sample_fraction`` f, is the number of rows
  the run has streamed so far (all ranks, estimated as this rank's × world size), but at least 10/f, so that a
  few bad rows at the very start do not stop a run (f = 0.01: more than 10 bad rows in the first 1,000).
The position is the train state's (epoch, micro-batches consumed); see data/streaming.py.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, Iterator

import torch

from data.dataset import Text2ImageTransform, image_root, load_hf_dataset
from data.streaming import StreamingText2ImageSource
from training.common import TrainingError
from training.stop import ignore_stop_signals, start_iterator

PROBES = 8  # samples read up front to check the columns hold usable data
MIN_BAD_SAMPLES = 10  # the bad-sample limit needs at least this many before it can stop a streamed run


class StreamingTrainData:
    """This rank's micro-batches of a streamed dataset; ``all_ranks(flag)`` is True iff every rank's flag is."""

    def __init__(self, source: StreamingText2ImageSource, all_ranks: Callable[[bool], bool], num_workers: int = 0,
                 max_bad_fraction: float = 0.01):
        self.source = source
        self.min_len = math.ceil(MIN_BAD_SAMPLES / max_bad_fraction) if max_bad_fraction > 0 else 1
        self.all_ranks = all_ranks
        # Its own generator: creating an iterator never consumes global random numbers (exact resume).
        self.loader = torch.utils.data.DataLoader(source, batch_size=source.batch_size, collate_fn=source.collate_fn,
                                                  num_workers=num_workers, worker_init_fn=ignore_stop_signals,
                                                  generator=torch.Generator().manual_seed(source.seed))
        self._rows_read = 0
        self._fallback: dict | None = None

    def __len__(self) -> int:
        return max(self.min_len, self._rows_read * self.source.world_size)

    def batches(self, epoch: int, start_batch: int) -> Iterator[dict]:
        """This rank's micro-batches of ``epoch`` after the first ``start_batch`` ones, while every rank has one."""
        self.source.set_position(epoch, start_batch)
        it = start_iterator(self.loader)  # workers never decide a stop (training/stop.py)
        while True:
            batch = next(it, None)
            full = batch is not None and len(batch["indices"]) + len(batch["bad_indices"]) == self.source.batch_size
            if not self.all_ranks(full):
                return
            self._rows_read += self.source.batch_size
            yield batch

    def substitute(self, batch: dict) -> dict:
        """A one-sample batch for a micro-batch whose samples are all unreadable: the first readable sample of
        this rank's stream (fixed, hence resumable)."""
        if self._fallback is None:
            for sample in self.source.peek(64):
                if "bad_reason" not in sample:
                    self._fallback = sample
                    break
            else:
                raise TrainingError("the first 64 streamed samples of this process are all unreadable; check the data")
        out = self.source.collate_fn([self._fallback])
        out["bad_indices"], out["bad_reasons"] = batch["bad_indices"], batch["bad_reasons"]
        return out


def check_stream_readable(source: StreamingText2ImageSource) -> None:
    """Clear error up front when none of the first samples can be used (wrong column, no images, ...)."""
    samples = source.peek(PROBES)
    if not samples:
        raise ValueError("the streamed dataset yielded no rows for this process; check the data path and the split")
    if all("bad_reason" in s for s in samples):
        reasons = "; ".join(f"#{s['index']}: {s['bad_reason']}" for s in samples[:3])
        raise ValueError(f"none of the first {len(samples)} streamed samples can be used ({reasons}). "
                         "Check --image_column / --caption_column and that the image column holds images.")


def build_streaming_data(args: argparse.Namespace, rank: int, world_size: int,
                         all_ranks: Callable[[bool], bool]) -> StreamingTrainData:
    """The flags' streamed dataset (hub id, parquet/jsonl/csv files, webdataset .tar shards), checked readable."""
    stream = load_hf_dataset(args.dataset_name, args.data_files, args.data_dir, streaming=True, cache_dir=args.cache_dir)
    transform = Text2ImageTransform(args.resolution, args.image_column, args.caption_column,
                                    center_crop=args.center_crop, random_flip=args.random_flip,
                                    data_dir=image_root(args.dataset_name, args.data_files, args.data_dir),
                                    seed=args.seed)
    source = StreamingText2ImageSource(stream, transform, args.train_batch_size, rank, world_size, seed=args.seed,
                                       shuffle_buffer=args.streaming_shuffle_buffer,
                                       max_samples=args.max_train_samples)
    check_stream_readable(source)
    return StreamingTrainData(source, all_ranks, args.dataloader_num_workers, args.max_bad_sample_fraction)

