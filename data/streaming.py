"""Streaming training data (``--streaming``): hub, parquet and webdataset sources read as they are used.

The source is a `datasets` ``IterableDataset`` (``load_hf_dataset(..., streaming=True)``).  Per epoch e, the
stream every rank sees is

    rows = source[:max_train_samples]                    (``take``: the same first rows as without streaming)
           → shuffle(seed, buffer) with epoch e           (only with ``--streaming_shuffle_buffer`` > 0)
           → split_dataset_by_node(rank, world_size)      (whole shards per rank when the shard count divides
                                                           evenly, else every world_size-th row)

and the rank cuts its rows into micro-batches: batch b = its rows [b·B, (b+1)·B).  All of this is a pure
function of (seed, epoch, rank, world_size), so the position is just (epoch, micro-batches consumed) — the
counters the training state already checkpoints — and a resumed run skips exactly the rows it had consumed
(``skip``: rows are read but images are not decoded).  The map-style path's crop/flip seeding by
(seed, epoch, index) is kept, with ``index = p · world_size + rank`` for the rank's p-th row of the epoch:
the global row number when rows are split one by one and not shuffled, else a position unique per epoch.

DataLoader workers: worker w of W produces micro-batches start + w, start + w + W, ... (reading, not
decoding, the others' rows); the DataLoader takes batches from its workers in turn, so the batch order
is the same for any number of workers.  The stream's end (a micro-batch shorter than B) is the end of the
epoch; the training loop makes every rank agree on it, since ranks can hold different row counts.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import torch

from data.dataset import Text2ImageTransform, _prepare_hf, _TransformedDataset

__all__ = ["StreamPosition", "StreamingText2ImageSource"]

_READ_BATCH = 64  # rows per arrow read


class StreamPosition:
    """Where a rank's stream starts: ``epoch`` and micro-batches of that epoch already consumed."""

    def __init__(self, epoch: int = 0, batches: int = 0):
        self.epoch, self.batches = int(epoch), int(batches)


class StreamingText2ImageSource(_TransformedDataset, torch.utils.data.IterableDataset):
    """This rank's training samples from a streamed `datasets` source (see module doc).

    Yields the samples of :class:`~data.dataset.Text2ImageTransform` (good or bad), in micro-batch order
    from :meth:`set_position`'s micro-batch on.  ``len()`` is undefined: the length of a stream is unknown.
    """

    def __init__(self, hf_iterable, transform: Text2ImageTransform, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle_buffer: int = 0, max_samples: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_buffer < 0:
            raise ValueError(f"--streaming_shuffle_buffer {shuffle_buffer} must be >= 0 (0 = stream order)")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"--max_train_samples {max_samples} must be >= 1")
        self.source = _prepare_hf(hf_iterable, transform.image_column, transform.caption_column, select=False)
        self.transform = transform
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle_buffer, self.max_samples = seed, shuffle_buffer, max_samples
        self.position = StreamPosition()

    # -- what the training loop uses (also ``resolution`` and ``collate_fn``, from _TransformedDataset) ------

    def set_position(self, epoch: int, batches: int) -> None:
        """Start the next iteration at micro-batch ``batches`` of ``epoch`` (crops/flips follow the epoch)."""
        self.position = StreamPosition(epoch, batches)
        self.transform.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    # -- the stream ------------------------------------------------------------------------------------

    def rank_rows(self, epoch: int):
        """This rank's rows of ``epoch`` as a `datasets` IterableDataset (take → shuffle → split)."""
        from datasets.distributed import split_dataset_by_node

        rows = self.source
        if self.max_samples is not None:
            rows = rows.take(self.max_samples)
        if self.shuffle_buffer > 0:
            rows = rows.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        rows.set_epoch(epoch)
        if self.world_size > 1:
            rows = split_dataset_by_node(rows, rank=self.rank, world_size=self.world_size)
        return rows

    def _row_iterator(self, epoch: int) -> Iterator[dict]:
        """This rank's rows, one dict each.  ``.iter()`` reads in the calling process: `datasets`' own split
        of a stream across DataLoader workers (by shard) would leave workers idle when shards are few."""
        for batch in self.rank_rows(epoch).iter(batch_size=_READ_BATCH):
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys)):
                yield dict(zip(keys, values))

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        epoch, start = self.position.epoch, self.position.batches
        b = self.batch_size
        # Skipped here, after the split: `datasets` applies ``skip`` before its per-node split.
        rows = itertools.islice(self._row_iterator(epoch), start * b, None)
        for local, row in enumerate(rows, start=start * b):
            if local == start * b:
                self._check_columns(row)
            if (local // b - start) % workers != worker_id:
                continue  # another worker's micro-batch
            yield self.transform(row, local * self.world_size + self.rank)

    def _check_columns(self, row: dict) -> None:
        from data.dataset import _missing_column_error

        columns = [("image", self.transform.image_column)] + [("caption", c) for c in self.transform.caption_columns]
        for kind, column in columns:
            if column not in row:
                raise _missing_column_error(kind, column, row.keys())

    def peek(self, count: int) -> list[dict]:
        """The first ``count`` samples of epoch 0 on this rank (start-up checks), without moving the position."""
        saved = self.position
        self.position = StreamPosition(0, 0)
        try:
            return list(itertools.islice(iter(self), count))
        finally:
            self.position = saved
