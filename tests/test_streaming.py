"""--streaming data: same samples as the map-style path, per-rank sharding, exact resume position, captions."""
from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import Text2ImageDataset, Text2ImageTransform, load_hf_dataset
from data.streaming import StreamingText2ImageSource

ROWS = 23  # not a multiple of batch × world: ragged last batches
BATCH = 4


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    rows = []
    for i in range(ROWS):
        pixels = (np.random.default_rng(i).random((20, 24, 3)) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        rows.append({"image": {"bytes": buf.getvalue(), "path": None}, "text": f"caption {i}", "alt": f"alt {i}",
                     "empty": "" if i % 2 else f"only {i}"})
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "alt": datasets.Value("string"), "empty": datasets.Value("string")})
    path = tmp_path_factory.mktemp("stream") / "data.parquet"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return str(path)


def _transform(caption="text"):
    # random crops and flips: a sample is only equal if its (seed, epoch, index) seeding is equal too
    return Text2ImageTransform(16, "image", caption, center_crop=False, random_flip=True, seed=5)


def _source(parquet, rank=0, world=1, **kwargs):
    stream = load_hf_dataset(data_files=parquet, streaming=True)
    kwargs.setdefault("seed", 5)
    return StreamingText2ImageSource(stream, _transform(kwargs.pop("caption", "text")), BATCH, rank, world, **kwargs)


def _batches(source, workers=0):
    loader = torch.utils.data.DataLoader(source, batch_size=BATCH, collate_fn=source.collate_fn, num_workers=workers)
    return list(loader)


def _map_style(parquet, caption="text"):
    return Text2ImageDataset(load_hf_dataset(data_files=parquet), 16, "image", caption, center_crop=False,
                             random_flip=True, seed=5)


@pytest.mark.parametrize("world", [1, 2])
def test_streaming_batches_equal_the_map_style_samples_of_the_same_rows(parquet, world):
    """Rank r streams rows r, r + W, ... in order; each sample equals the map-style dataset's sample of that row."""
    reference = _map_style(parquet)
    seen = []
    for rank in range(world):
        batches = _batches(_source(parquet, rank, world))
        rows = [i for b in batches for i in b["indices"]]
        assert rows == list(range(rank, ROWS, world))
        assert [len(b["indices"]) for b in batches[:-1]] == [BATCH] * (len(batches) - 1)
        for batch in batches:
            expected = reference.collate_fn([reference[i] for i in batch["indices"]])
            assert torch.equal(batch["pixel_values"], expected["pixel_values"])
            assert batch["captions"] == expected["captions"]
        seen += rows
    assert sorted(seen) == list(range(ROWS))  # disjoint and complete


def test_dataloader_workers_do_not_change_the_batch_order(parquet):
    plain = _batches(_source(parquet, 1, 2))
    for workers in (2, 3):
        with_workers = _batches(_source(parquet, 1, 2), workers=workers)
        assert [b["indices"] for b in with_workers] == [b["indices"] for b in plain]
        assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(plain, with_workers))


@pytest.mark.parametrize("shuffle_buffer", [0, 5])
def test_resume_position_continues_with_the_next_micro_batch(parquet, shuffle_buffer, monkeypatch):
    """set_position(epoch, k) yields exactly the uninterrupted epoch's batches k, k+1, ... (also shuffled, epoch 1)."""
    # `datasets` sleeps 5 s after each shuffled parquet pass (an arrow thread-shutdown workaround); 0.2 s here.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.2)
    for epoch in (0, 1):
        full = _source(parquet, 0, 2, shuffle_buffer=shuffle_buffer)
        full.set_epoch(epoch)
        uninterrupted = _batches(full)
        resumed = _source(parquet, 0, 2, shuffle_buffer=shuffle_buffer)
        resumed.set_position(epoch, 2)
        tail = _batches(resumed)
        assert [b["indices"] for b in tail] == [b["indices"] for b in uninterrupted[2:]]
        assert [b["captions"] for b in tail] == [b["captions"] for b in uninterrupted[2:]]
        assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(tail, uninterrupted[2:]))
    first, second = _source(parquet, shuffle_buffer=5), _source(parquet, shuffle_buffer=5)
    second.set_epoch(1)
    order = lambda s: [c for b in _batches(s) for c in b["captions"]]  # indices are stream positions
    if shuffle_buffer:
        assert order(first) != order(second)  # a new order per epoch
        assert sorted(order(first)) == sorted(order(second)) == sorted(f"caption {i}" for i in range(ROWS))


def test_max_train_samples_takes_the_first_rows(parquet):
    rows = [i for rank in range(2) for b in _batches(_source(parquet, rank, 2, max_samples=10)) for i in b["indices"]]
    assert sorted(rows) == list(range(10))


def test_caption_drawn_from_several_columns_is_seeded_and_skips_empty_ones(parquet):
    reference = _map_style(parquet, "text,alt")
    batches = _batches(_source(parquet, caption="text,alt"))
    captions = [c for b in batches for c in b["captions"]]
    assert captions == [reference[i]["caption"] for i in range(ROWS)]  # same draw in both paths
    assert {c.split()[0] for c in captions} == {"caption", "alt"}  # both columns are used
    assert captions == [c for b in _batches(_source(parquet, caption="text,alt")) for c in b["captions"]]
    # An empty caption in one column falls back to the other; only rows with no usable caption are bad.
    mixed = _map_style(parquet, "empty,text")
    assert all("bad_reason" not in mixed[i] for i in range(ROWS))
    only_empty = _map_style(parquet, "empty")
    assert "bad_reason" in only_empty[1] and "bad_reason" not in only_empty[0]


def test_missing_caption_column_is_named(parquet):
    with pytest.raises(ValueError, match="caption column 'nope' not found"):
        _source(parquet, caption="text,nope")


def test_unreadable_rows_are_bad_samples_not_errors():
    """A zero-byte image and an empty caption are reported (index + reason) and the good row still arrives."""
    png = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(png, "PNG")
    rows = [{"image": {"bytes": png.getvalue(), "path": None}, "text": "fine"},
            {"image": {"bytes": b"", "path": None}, "text": "zero bytes"},
            {"image": {"bytes": png.getvalue(), "path": None}, "text": ""}]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    stream = datasets.Dataset.from_list(rows, features=features).to_iterable_dataset()
    source = StreamingText2ImageSource(stream, Text2ImageTransform(8, "image", "text"), batch_size=3)
    (batch,) = _batches(source)
    assert batch["indices"] == [0] and batch["bad_indices"] == [1, 2]
    assert batch["bad_reasons"][1] == "empty caption" and "image" in batch["bad_reasons"][0]
    assert torch.allclose(batch["pixel_values"], torch.full((1, 3, 8, 8), 200 / 127.5 - 1))


def test_bad_sample_base_of_a_stream_grows_with_the_rows_read(parquet):
    from training.streaming_data import StreamingTrainData

    data = StreamingTrainData(_source(parquet, 1, 2), all_ranks=lambda flag: flag, max_bad_fraction=0.1)
    assert len(data) == 100  # 10 / 0.1: a few bad rows early on cannot stop the run
    batches = list(data.batches(0, 0))
    assert [len(b["indices"]) for b in batches] == [BATCH] * 2  # rank 1 holds 11 rows: the ragged 3rd is dropped
    loose = StreamingTrainData(_source(parquet, 1, 2), lambda f: f, max_bad_fraction=1.0)
    assert len(loose) == 10
    for _ in range(3):
        list(loose.batches(0, 0))
    assert len(loose) == 3 * 2 * BATCH * 2  # rows read (this rank's × world size) once past the minimum
