"""Training dataset: loading, image transforms, bad samples, collation (data/dataset.py; streaming: test_streaming.py)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import (
    Text2ImageCollator,
    Text2ImageDataset,
    collate_text2image,
    load_hf_dataset,
    preprocess_image,
    to_rgb,
)
from data.tiny_flux import PARQUET_FILENAME, build_tiny_dataset

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _split_image(w: int, h: int, first=RED, second=BLUE, vertical: bool = True) -> Image.Image:
    """Left/right (or top/bottom) halves in two colours."""
    arr = np.zeros((h, w, 3), np.uint8)
    if vertical:
        arr[:, : w // 2], arr[:, w // 2 :] = first, second
    else:
        arr[: h // 2], arr[h // 2 :] = first, second
    return Image.fromarray(arr, "RGB")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _expected(rgb) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def small_parquet(tmp_path_factory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("ds") / "tiny-data", num_images=10, resolution=32, seed=1)


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "hf-cache")


# ------------------------------------------------------------------------ transforms


def test_resize_and_centre_crop_wide_image():
    # 40x20, red | blue split at x=20. Short side 20 -> 16: resized to 32x16, split at x=16;
    # centre crop starts at (32-16)//2 = 8, so the split lands on output column 8.
    x = preprocess_image(_split_image(40, 20), 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    for col in range(0, 5):
        assert torch.allclose(x[:, :, col], _expected(RED)[:, None].expand(3, 16)), col
    for col in range(12, 16):
        assert torch.allclose(x[:, :, col], _expected(BLUE)[:, None].expand(3, 16)), col
    # the boundary is blended, not shifted: red dominates left of 8, blue right of it
    assert x[0, :, 7].mean() > x[2, :, 7].mean() and x[2, :, 8].mean() > x[0, :, 8].mean()
    assert torch.equal(x[:, 0], x[:, 15])  # every row identical


def test_resize_and_centre_crop_tall_image():
    x = preprocess_image(_split_image(20, 40, vertical=False), 16)
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x[:, 0, :], _expected(RED)[:, None].expand(3, 16))
    assert torch.allclose(x[:, 15, :], _expected(BLUE)[:, None].expand(3, 16))


def test_exact_size_image_is_not_resampled():
    arr = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    x = preprocess_image(Image.fromarray(arr), 16)
    assert torch.equal(x, torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1))


def test_random_crop_and_flip_are_seeded_by_index():
    rows = [{"image": _png(_split_image(40, 20)), "llava": "split"}]
    ds = Text2ImageDataset(rows * 16, 16, center_crop=False, random_flip=True)
    a, b = ds[3]["pixel_values"], ds[3]["pixel_values"]
    assert torch.equal(a, b)  # same index -> same crop and flip
    flipped = [bool(ds[i]["pixel_values"][2, 0, 0] > 0) for i in range(16)]  # blue at the left edge
    assert any(flipped) and not all(flipped)
    epoch0 = [ds[i]["pixel_values"] for i in range(16)]
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i]["pixel_values"], epoch0[i]) for i in range(16))
    for i in range(16):  # every crop stays inside the 32x16 resized image: left half red, right blue
        x = ds[i]["pixel_values"]
        assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_mode_conversions():
    grey = to_rgb(Image.new("L", (4, 4), 100))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (100, 100, 100)

    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent -> white
    rgba.putpixel((1, 0), (255, 0, 0, 255))  # opaque -> red
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black over white -> mid grey
    out = to_rgb(rgba)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (255, 0, 0)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 0)))

    la = to_rgb(Image.new("LA", (2, 2), (0, 0)))
    assert la.getpixel((0, 0)) == (255, 255, 255)

    p = Image.new("RGB", (2, 2), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert to_rgb(p).getpixel((1, 1)) == (10, 200, 30)
    p_t = p.copy()
    p_t.info["transparency"] = p.getpixel((0, 0))
    assert to_rgb(p_t).getpixel((0, 0)) == (255, 255, 255)

    cmyk = to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0)))
    assert cmyk.getpixel((0, 0)) == (255, 0, 0)

    i16 = Image.fromarray(np.full((2, 2), 65535, np.uint16))
    assert i16.mode.startswith("I;16") or i16.mode == "I"
    assert to_rgb(i16).getpixel((0, 0)) == (255, 255, 255)


def test_modes_through_the_dataset():
    imgs = [Image.new("L", (20, 10), 0), Image.new("RGBA", (10, 10), (0, 0, 0, 0)),
            Image.new("RGB", (10, 10), (255, 0, 0)).convert("P")]
    rows = [{"image": _png(im), "llava": f"mode {im.mode}"} for im in imgs]
    ds = Text2ImageDataset(rows, 8)
    assert torch.all(ds[0]["pixel_values"] == -1.0)  # black
    assert torch.all(ds[1]["pixel_values"] == 1.0)  # transparent -> white
    assert torch.allclose(ds[2]["pixel_values"][:, 4, 4], _expected(RED))


# ------------------------------------------------------------------------ validation + bad samples


def test_missing_columns_name_the_column_and_the_flag(small_parquet, cache_dir):
    ds = load_hf_dataset(str(small_parquet), cache_dir=cache_dir)
    with pytest.raises(ValueError) as e:
        Text2ImageDataset(ds, 16, caption_column="text")
    msg = str(e.value)
    assert "'text'" in msg and "--caption_column" in msg and "llava" in msg and "image" in msg
    with pytest.raises(ValueError) as e:
        Text2ImageDataset(ds, 16, image_column="jpg")
    assert "'jpg'" in str(e.value) and "--image_column" in str(e.value)


def test_empty_dataset_is_rejected():
    empty = datasets.Dataset.from_dict({"image": [], "llava": []})
    with pytest.raises(ValueError, match="0 rows"):
        Text2ImageDataset(empty, 16)


def test_bad_samples_are_reported_not_raised(tmp_path):
    good = _split_image(24, 16)
    jpeg = _jpeg(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    truncated = jpeg[: len(jpeg) // 2]
    assert Image.open(io.BytesIO(truncated)).size == (64, 64)  # the header is valid
    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    (tmp_path / "good.png").write_bytes(_png(good))
    rows = {
        "image": [
            {"bytes": _png(good), "path": None},  # 0 good
            {"bytes": truncated, "path": "cut.jpg"},  # 1 truncated JPEG
            {"bytes": None, "path": str(zero)},  # 2 zero-byte file
            {"bytes": _png(good), "path": None},  # 3 empty caption
            {"bytes": b"not an image at all", "path": None},  # 4 garbage
            {"bytes": None, "path": "good.png"},  # 5 relative path -> data_dir
            {"bytes": _png(good), "path": None},  # 6 None caption
            {"bytes": None, "path": str(tmp_path / "missing.png")},  # 7 missing file
        ],
        "llava": ["ok", "ok", "ok", "   \n", "ok", "relative ok", None, "ok"],
    }
    features = datasets.Features({"image": datasets.Image(), "llava": datasets.Value("string")})
    hf = datasets.Dataset.from_dict(rows, features=features)
    ds = Text2ImageDataset(hf, 16, data_dir=str(tmp_path))

    samples = [ds[i] for i in range(len(ds))]  # must not raise
    reasons = {s["index"]: s["bad_reason"] for s in samples if "bad_reason" in s}
    assert set(reasons) == {1, 2, 3, 4, 6, 7}
    assert reasons[1].startswith("truncated image")
    assert "0 bytes" in reasons[2]
    assert reasons[3] == "empty caption" and reasons[6] == "missing caption"
    assert reasons[4].startswith("undecodable image")
    assert "not found" in reasons[7]
    for s in samples:
        assert set(s) in ({"index", "bad_reason"}, {"pixel_values", "caption", "index"})
    assert samples[5]["caption"] == "relative ok"

    batch = collate_text2image(samples)
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["indices"] == [0, 5] and batch["captions"] == ["ok", "relative ok"]
    assert batch["bad_indices"] == [1, 2, 3, 4, 6, 7]
    assert batch["bad_reasons"] == [reasons[i] for i in batch["bad_indices"]]

    # through a DataLoader; an all-bad batch keeps the spatial shape
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ds.collate_fn)
    batches = list(loader)
    assert [b["indices"] for b in batches] == [[0], [5]]
    assert batches[0]["pixel_values"].shape == (1, 3, 16, 16)
    all_bad = Text2ImageCollator(16)([ds[1], ds[2]])
    assert all_bad["pixel_values"].shape == (0, 3, 16, 16) and all_bad["bad_indices"] == [1, 2]


# ------------------------------------------------------------------------ loading


def test_load_local_folders_files_and_globs(tmp_path, small_parquet, cache_dir):
    assert len(load_hf_dataset(str(small_parquet), cache_dir=cache_dir)) == 10
    assert len(load_hf_dataset(data_dir=str(small_parquet), cache_dir=cache_dir)) == 10
    assert len(load_hf_dataset(str(small_parquet / PARQUET_FILENAME), cache_dir=cache_dir)) == 10
    assert len(load_hf_dataset(data_files=str(small_parquet / "*.parquet"), cache_dir=cache_dir)) == 10
    assert len(load_hf_dataset("parquet", data_files=[str(small_parquet / PARQUET_FILENAME)],
                               cache_dir=cache_dir)) == 10
    streamed = load_hf_dataset(str(small_parquet), streaming=True, cache_dir=cache_dir)
    assert isinstance(streamed, datasets.IterableDataset) and sum(1 for _ in streamed) == 10

    folder = build_tiny_dataset(tmp_path / "imgs", num_images=5, resolution=16, format="imagefolder")
    ds = load_hf_dataset(str(folder), cache_dir=cache_dir)
    assert len(ds) == 5 and set(ds.column_names) == {"image", "llava"}
    assert Text2ImageDataset(ds, 8)[0]["pixel_values"].shape == (3, 8, 8)

    # jsonl with relative image paths, resolved against data_dir by the dataset
    jl = tmp_path / "captions.jsonl"
    jl.write_text("".join(json.dumps({"image": f"{i:05d}.png", "llava": "a shape"}) + "\n" for i in range(5)))
    ds = load_hf_dataset(str(jl), cache_dir=cache_dir)
    assert ds.column_names == ["image", "llava"]
    t2i = Text2ImageDataset(ds, 8, data_dir=str(folder))
    assert all("pixel_values" in t2i[i] for i in range(5))


def test_load_errors(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="does not exist"):
        load_hf_dataset(str(tmp_path / "nope"), cache_dir=cache_dir)
    with pytest.raises(ValueError, match="does not exist"):
        load_hf_dataset(data_dir=str(tmp_path / "nope"), cache_dir=cache_dir)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match="no data files found"):
        load_hf_dataset(str(tmp_path / "notes"), cache_dir=cache_dir)
    with pytest.raises(ValueError, match="no data files found matching"):
        load_hf_dataset(data_files=str(tmp_path / "*.parquet"), cache_dir=cache_dir)
    with pytest.raises(ValueError, match="no dataset given"):
        load_hf_dataset()

    empty = tmp_path / "empty"
    empty.mkdir()
    datasets.Dataset.from_dict({"image": [], "llava": []},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "llava": datasets.Value("string")})
                               ).to_parquet(str(empty / "train.parquet"))
    (tmp_path / "empty.jsonl").write_text("")
    for source in (str(empty), str(empty / "train.parquet"), str(tmp_path / "empty.jsonl")):
        with pytest.raises(ValueError, match="has 0 rows"):
            load_hf_dataset(source, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="Hub"):
        load_hf_dataset("nobody/no-such-dataset-offline", cache_dir=cache_dir)
