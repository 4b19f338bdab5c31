"""Training data: load an image-caption dataset with `datasets` and turn rows into tensors.

* :func:`load_hf_dataset` loads a Hub dataset, a local folder (imagefolder / parquet / ...), or
  local files and globs, with clear errors for missing paths and empty datasets.
* :class:`Text2ImageDataset` (map-style) and :class:`Text2ImageTransform` decode images themselves,
  so one corrupt image or empty caption gives a *bad sample* ``{"index": i, "bad_reason": ...}``
  instead of an exception.  The streamed dataset of ``--streaming`` is
  :class:`data.streaming.StreamingText2ImageSource`, built on the same transform.
* :func:`collate_text2image` / :class:`Text2ImageCollator` stack the good samples and report the
  bad ones, so the training loop can log and skip them.

Images become float32 ``[3, R, R]`` tensors in ``[-1, 1]``: RGB conversion (alpha composited on
white), shorter side resized to ``R`` (bicubic), centre or random crop, optional horizontal flip.
No torchvision.
"""
from __future__ import annotations

import glob
import io
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "load_hf_dataset",
    "image_root",
    "Text2ImageDataset",
    "Text2ImageTransform",
    "Text2ImageCollator",
    "collate_text2image",
    "decode_image",
    "to_rgb",
    "preprocess_image",
    "BadSampleError",
]

# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_EXT_TO_BUILDER = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".arrow": "arrow",
    ".tar": "webdataset",
}
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_PACKAGED_BUILDERS = {"parquet", "json", "csv", "arrow", "imagefolder", "text", "webdataset"}
_GLOB_CHARS = set("*?[")


def _has_glob(s: str) -> bool:
    return any(c in s for c in _GLOB_CHARS)


def _looks_like_path(s: str) -> bool:
    """True for strings that can only be meant as local paths (not ``owner/name`` Hub ids)."""
    return s.startswith(("/", "./", "../", "~")) or Path(s).suffix.lower() in _EXT_TO_BUILDER or _has_glob(s)


def _local_files(folder: Path) -> list[Path]:
    """All non-hidden files under ``folder``, sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
    return out


def _resolve_data_files(data_files: str | Sequence[str], base: str | None) -> list[Path]:
    items = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    if not items:
        raise ValueError("data_files is empty")
    out: list[Path] = []
    for item in items:
        item = os.path.expanduser(str(item))
        if base and not os.path.isabs(item):
            item = os.path.join(base, item)
        if _has_glob(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ValueError(f"no data files found matching {item!r}")
            out.extend(matches)
        elif os.path.isdir(item):
            found = [p for p in _local_files(Path(item)) if p.suffix.lower() in _EXT_TO_BUILDER]
            if not found:
                raise ValueError(
                    f"no data files found in {item!r} (looked for {', '.join(sorted(_EXT_TO_BUILDER))})"
                )
            out.extend(found)
        elif os.path.isfile(item):
            out.append(Path(item))
        else:
            raise ValueError(f"data file does not exist: {item!r}")
    return out


def _builder_for_files(files: list[Path]) -> str:
    builders = {_EXT_TO_BUILDER.get(f.suffix.lower()) for f in files}
    if None in builders:
        bad = sorted({f.suffix or f.name for f in files if f.suffix.lower() not in _EXT_TO_BUILDER})
        raise ValueError(
            f"unsupported data file type(s) {bad}; supported: {', '.join(sorted(_EXT_TO_BUILDER))} "
            "(or a folder of images with metadata.jsonl)"
        )
    if len(builders) > 1:
        raise ValueError(f"data files mix formats {sorted(builders)}; pass files of one format")
    return builders.pop()


def _file_is_empty(f: Path) -> bool:
    if f.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq

            return pq.ParquetFile(f).metadata.num_rows == 0
        except Exception:
            return False  # let `datasets` report an unreadable file
    try:
        if f.stat().st_size == 0:
            return True
        if f.stat().st_size < 4096 and f.suffix.lower() in (".jsonl", ".json", ".csv"):
            text = f.read_text(errors="replace").strip()
            return not text or (f.suffix.lower() == ".csv" and "\n" not in text)  # empty or header only
    except OSError:
        return False
    return False


def _empty_error(where: str, split: str) -> ValueError:
    return ValueError(
        f"the dataset at {where} has 0 rows; check the path, the split ({split!r}) and that the data "
        "files are not empty"
    )


#: Caption files a user puts beside an images folder (``data.jsonl`` + ``imgs/``); ``.json`` is left out
#: because folders often hold JSON info files.
_CAPTION_FILE_EXTS = {".jsonl", ".csv"}
_IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv")


def _check_imagefolder_metadata(folder: Path) -> None:
    """An empty ``metadata.jsonl``/``.csv`` makes `datasets` fail with an IndexError: say what to write instead."""
    for name in _IMAGEFOLDER_METADATA:
        f = folder / name
        if f.is_file() and _file_is_empty(f):
            raise ValueError(
                f"{f} is empty: an imagefolder's {name} needs one row per image, e.g. "
                '{"file_name": "imgs/0.png", "text": "a red circle"} (then --caption_column text), '
                "or delete it and pass the captions with --data_files")


def _caption_file_layout(folder: Path, files: list[Path]) -> tuple[str, dict] | None:
    """A caption file (jsonl/csv) beside images in ``folder``: (builder, kwargs); ambiguous layouts raise."""
    top = sorted(f for f in files if f.parent == folder and f.suffix.lower() in _CAPTION_FILE_EXTS)
    captions = [f for f in top if f.name not in _IMAGEFOLDER_METADATA]
    if not captions or not any(f.suffix.lower() in _IMAGE_EXTS for f in files):
        return None
    metadata = [f.name for f in top if f.name in _IMAGEFOLDER_METADATA]
    if metadata or len(captions) > 1:
        found = ", ".join([*metadata, *(f.name for f in captions)])
        raise ValueError(
            f"{folder} holds images and several caption files ({found}), so it is ambiguous which one to train "
            f"on. Pass one with --data_files {captions[0]} (relative image paths are read against its folder)"
            + (f", or --dataset_name imagefolder --data_dir {folder} for the imagefolder's metadata" if metadata else ""))
    return _EXT_TO_BUILDER[captions[0].suffix.lower()], {"data_files": captions}


def _detect_folder(folder: Path) -> tuple[str, dict]:
    """Choose a `datasets` builder for a local folder: (builder, load_dataset kwargs)."""
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        return "load_from_disk", {}
    files = _local_files(folder)
    names = {f.name for f in files}
    beside_images = _caption_file_layout(folder, files)
    if beside_images is not None:
        return beside_images
    if names & set(_IMAGEFOLDER_METADATA):
        _check_imagefolder_metadata(folder)
        return "imagefolder", {"data_dir": str(folder)}
    by_builder: dict[str, list[Path]] = {}
    for f in files:
        if f.stem == "metadata":
            continue
        b = _EXT_TO_BUILDER.get(f.suffix.lower())
        if b:
            by_builder.setdefault(b, []).append(f)
    if "parquet" in by_builder:
        return "parquet", {"data_files": by_builder["parquet"]}
    if any(f.suffix.lower() in _IMAGE_EXTS for f in files):
        return "imagefolder", {"data_dir": str(folder)}
    for b in ("arrow", "json", "csv"):
        if b in by_builder:
            return b, {"data_files": by_builder[b]}
    raise ValueError(
        f"no data files found in {str(folder)!r}: expected images with metadata.jsonl, or "
        f"{', '.join(sorted(_EXT_TO_BUILDER))} files"
    )


def load_hf_dataset(
    dataset_name: str | None = None,
    data_files: str | list[str] | None = None,
    data_dir: str | None = None,
    split: str = "train",
    streaming: bool = False,
    cache_dir: str | None = None,
):
    """Load an image-caption dataset as a `datasets` ``Dataset`` (``IterableDataset`` if streaming).

    Accepted sources, checked in this order:

    * ``dataset_name`` a packaged builder (``"parquet"``, ``"imagefolder"``, ...): passed to
      ``load_dataset`` with ``data_files`` / ``data_dir``;
    * ``data_files``: a file, glob or list of them (relative to ``data_dir`` if given); the
      builder comes from the extension (``.parquet``, ``.jsonl``/``.json``, ``.csv``, ``.arrow``);
    * ``dataset_name`` or ``data_dir`` a local folder: ``metadata.jsonl``/``metadata.csv`` or
      images → ``imagefolder``; else parquet files → ``parquet``; else arrow / json / csv files;
      a ``save_to_disk`` folder → ``load_from_disk``;
    * ``dataset_name`` a local file or glob (as for ``data_files``);
    * otherwise ``dataset_name`` is a Hub dataset id.

    Raises ``ValueError`` for a missing path, a folder or glob with no data files, and an empty
    dataset. Row counts are only checked without streaming (and from file metadata when local).
    """
    import datasets

    common = {"split": split, "streaming": streaming, "cache_dir": cache_dir}

    def _load(builder: str, where: str, files: list[Path] | None = None, **kwargs):
        if files is not None:
            if all(_file_is_empty(f) for f in files):
                raise _empty_error(where, split)
            kwargs["data_files"] = [str(f) for f in files]
        try:
            ds = datasets.load_dataset(builder, **kwargs, **common)
        except (datasets.exceptions.DatasetGenerationError, StopIteration) as e:
            cause = e.__cause__ or e.__context__ or e
            raise ValueError(f"could not read the dataset at {where} ({type(cause).__name__}: {cause})") from e
        return _check_rows(ds, where)

    def _check_rows(ds, where: str):
        if not streaming and len(ds) == 0:
            raise _empty_error(where, split)
        return ds

    if dataset_name is None and data_files is None and data_dir is None:
        raise ValueError("no dataset given: pass a Hub dataset name or local path, data_files, or data_dir")

    if dataset_name in _PACKAGED_BUILDERS:
        files = _resolve_data_files(data_files, data_dir) if data_files is not None else None
        if data_dir is not None and not os.path.isdir(data_dir):
            raise ValueError(f"data_dir does not exist: {data_dir!r}")
        if dataset_name == "imagefolder" and data_dir is not None:
            _check_imagefolder_metadata(Path(data_dir))
        extra = {"data_dir": data_dir} if data_dir is not None and files is None else {}
        return _load(dataset_name, str(data_files or data_dir), files, **extra)

    if data_files is not None and dataset_name is None:
        files = _resolve_data_files(data_files, data_dir)
        return _load(_builder_for_files(files), str(data_files), files)

    local = dataset_name if dataset_name is not None else data_dir
    if dataset_name is None or os.path.exists(os.path.expanduser(dataset_name)) or _looks_like_path(dataset_name):
        path = Path(os.path.expanduser(local))
        if _has_glob(str(local)) or path.is_file():
            files = _resolve_data_files(str(local), None)
            return _load(_builder_for_files(files), str(local), files)
        if not path.exists():
            what = "data_dir" if dataset_name is None else "dataset path"
            raise ValueError(f"{what} does not exist: {str(local)!r}")
        builder, kwargs = _detect_folder(path)
        if builder == "load_from_disk":
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"split {split!r} not in {str(path)!r}; available: {list(ds)}")
                ds = ds[split]
            if len(ds) == 0:
                raise _empty_error(str(path), split)
            return ds.to_iterable_dataset() if streaming else ds
        files = kwargs.pop("data_files", None)
        return _load(builder, str(path), files, **kwargs)

    # A Hub dataset id.
    try:
        ds = datasets.load_dataset(dataset_name, data_dir=data_dir, data_files=data_files, **common)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise ValueError(
            f"could not load {dataset_name!r}: no local path of that name exists and the Hub lookup failed "
            f"({type(e).__name__}: {e}). Offline runs (HF_DATASETS_OFFLINE=1) need a local path or a cached dataset."
        ) from e
    return _check_rows(ds, repr(dataset_name))


def image_root(
    dataset_name: str | None = None,
    data_files: str | list[str] | None = None,
    data_dir: str | None = None,
) -> str | None:
    """The folder that relative image paths in the metadata are read against, for the same arguments
    as :func:`load_hf_dataset`.

    ``data_dir`` when given (it is the dataset root: ``data_files`` are read against it too); else the
    folder of the metadata file (``--data_files`` or ``--dataset_name FILE``, as `datasets`' imagefolder
    does with ``metadata.jsonl``) or the local ``--dataset_name`` folder; None for Hub datasets. jsonl/csv
    files from several folders are ambiguous and raise ``ValueError`` naming the flag that settles it.
    """
    if data_dir is not None:
        return data_dir
    source = data_files
    if source is None and dataset_name is not None and dataset_name not in _PACKAGED_BUILDERS:
        local = os.path.expanduser(dataset_name)
        if os.path.isdir(local):
            return local
        if os.path.isfile(local) or _has_glob(local):
            source = local
    if source is None:
        return None
    files = _resolve_data_files(source, None)
    folders = sorted({str(f.parent) for f in files})
    if len(folders) == 1:
        return folders[0]
    if any(f.suffix.lower() in _CAPTION_FILE_EXTS | {".json"} for f in files):
        raise ValueError(f"the metadata files lie in {len(folders)} folders ({', '.join(folders[:3])}), so relative "
                         "image paths are ambiguous: pass --data_dir ROOT to read them against ROOT")
    return None


# --------------------------------------------------------------------------------------------
# Decoding and transforms
# --------------------------------------------------------------------------------------------


class BadSampleError(Exception):
    """A sample that cannot be used; ``str(e)`` is the short reason."""


def _decode_error(e: Exception) -> BadSampleError:
    kind = "truncated image" if "truncat" in str(e).lower() else "undecodable image"
    return BadSampleError(f"{kind}: {type(e).__name__}: {e}"[:200])


def decode_image(value: Any, data_dir: str | os.PathLike | None = None) -> Image.Image:
    """Fully decode an image value from a `datasets` row into a loaded PIL image.

    Accepts ``{"bytes": ..., "path": ...}`` (what ``datasets.Image(decode=False)`` gives), raw
    bytes, a path string (relative paths are joined to ``data_dir``), a PIL image or an HxW[xC]
    uint8 array. ``Image.open(...).load()`` runs here so truncated files fail here (keep
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` False). EXIF orientation is applied. Raises
    :class:`BadSampleError` with a short reason.
    """
    if value is None:
        raise BadSampleError("missing image")
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, np.ndarray):
        try:
            img = Image.fromarray(value)
        except Exception as e:
            raise BadSampleError(f"undecodable image array: {e}") from e
    else:
        data, path = None, None
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
        elif isinstance(value, (str, os.PathLike)):
            path = value
        else:
            raise BadSampleError(f"unsupported image value of type {type(value).__name__}")
        if data is None:
            if not path:
                raise BadSampleError("missing image")
            path = os.path.expanduser(str(path))
            joined = data_dir is not None and not os.path.isabs(path)
            if joined:
                path = os.path.join(str(data_dir), path)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError as e:
                hint = f" (relative image paths are read against {data_dir}; --data_dir sets that folder)" if joined else ""
                raise BadSampleError(f"image file not found: {path}{hint}") from e
            except OSError as e:
                raise BadSampleError(f"unreadable image file: {e}") from e
        if len(data) == 0:
            raise BadSampleError("empty image file (0 bytes)")
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as e:
            raise BadSampleError("undecodable image: not a recognised image format") from e
        except Exception as e:
            raise _decode_error(e) from e
    try:
        img.load()
    except Exception as e:
        raise _decode_error(e) from e
    if img.width < 1 or img.height < 1:
        raise BadSampleError(f"empty image ({img.width}x{img.height})")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:
        pass  # broken EXIF: keep the pixels as stored
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB.

    Transparency (RGBA, LA, PA, P or L/RGB with a ``transparency`` key) is composited over white;
    16/32-bit integer and float greyscale (``I;16*``, ``I``, ``F``) are rescaled to 8 bits; CMYK,
    YCbCr, 1-bit etc. go through PIL's ``convert``.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif mode == "I":
            arr = arr / 257.0 if arr.size and arr.max() > 255 else arr
        else:  # "F": [0, 1] floats or [0, 255]
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def preprocess_image(
    img: Image.Image,
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """PIL image → float32 tensor ``[3, resolution, resolution]`` in ``[-1, 1]``.

    RGB conversion (:func:`to_rgb`); the shorter side is resized to ``resolution`` with bicubic
    filtering (the longer side to ``round(long * resolution / short)``); then a centre crop at
    offset ``(size - resolution) // 2``, or a random crop drawn from ``rng``; then, if
    ``random_flip``, a horizontal flip with probability 1/2 drawn from ``rng``.
    """
    img = to_rgb(img)
    w, h = img.size
    r = resolution
    if min(w, h) != r:
        scale = r / min(w, h)
        nw = r if w <= h else max(r, round(w * scale))
        nh = r if h <= w else max(r, round(h * scale))
        img = img.resize((nw, nh), resample=Image.Resampling.BICUBIC)
        w, h = nw, nh
    if rng is None:
        rng = np.random.default_rng(0)
    if center_crop:
        left, top = (w - r) // 2, (h - r) // 2
    else:
        left, top = int(rng.integers(0, w - r + 1)), int(rng.integers(0, h - r + 1))
    if (w, h) != (r, r):
        img = img.crop((left, top, left + r, top + r))
    arr = np.asarray(img, dtype=np.float32)
    if random_flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    arr = arr / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class Text2ImageTransform:
    """Row ``{image_column: ..., caption_column: ...}`` + index → training sample or bad sample.

    Good: ``{"pixel_values": Tensor[3, R, R], "caption": str, "index": i}``. Bad (never raises
    for data problems): ``{"index": i, "bad_reason": str}``. Random crops / flips are seeded by
    ``(seed, epoch, index)``, so a sample is reproducible; call :meth:`set_epoch` to vary them.
    """

    def __init__(
        self,
        resolution: int,
        image_column: str = "image",
        caption_column: str = "llava",
        center_crop: bool = True,
        random_flip: bool = False,
        data_dir: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = resolution
        self.image_column = image_column
        self.caption_column = caption_column
        self.caption_columns = caption_columns(caption_column)
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.data_dir = data_dir
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _caption(self, row: dict, index: int):
        """The caption column's value; with several columns, a random usable one, seeded by (seed, epoch, index)."""
        if len(self.caption_columns) == 1:
            return row.get(self.caption_column)
        usable = [c for c in self.caption_columns if isinstance(row.get(c), str) and row[c].strip()]
        if not usable:
            return row.get(self.caption_columns[0])  # reported as missing/empty below
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])  # own stream: crops/flips unchanged
        return row[usable[int(rng.integers(len(usable)))]]

    def __call__(self, row: dict, index: int) -> dict:
        try:
            caption = self._caption(row, index)
            if caption is None:
                raise BadSampleError("missing caption")
            if not isinstance(caption, str):
                raise BadSampleError(f"caption is not a string ({type(caption).__name__})")
            caption = caption.strip()
            if not caption:
                raise BadSampleError("empty caption")
            img = decode_image(row.get(self.image_column), self.data_dir)
            rng = np.random.default_rng([self.seed, self.epoch, index])
            pixels = preprocess_image(img, self.resolution, self.center_crop, self.random_flip, rng)
        except BadSampleError as e:
            return {"index": index, "bad_reason": str(e)}
        except Exception as e:  # e.g. a decoder bug on hostile input: still a bad sample, not a crash
            return {"index": index, "bad_reason": f"{type(e).__name__}: {e}"[:200]}
        return {"pixel_values": pixels, "caption": caption, "index": index}


def caption_columns(caption_column: str) -> tuple[str, ...]:
    """``--caption_column`` names one column or several separated by commas (then one is drawn per sample)."""
    names = tuple(c.strip() for c in str(caption_column).split(",") if c.strip())
    if not names:
        raise ValueError(f"--caption_column {caption_column!r} names no column")
    return names


def _missing_column_error(kind: str, column: str, available: Iterable[str]) -> ValueError:
    return ValueError(
        f"{kind} column {column!r} not found in the dataset; available columns: {sorted(available)}. "
        f"Set --{kind}_column to one of them."
    )


def _prepare_hf(ds, image_column: str, caption_column: str, select: bool = True):
    """Check the columns and switch an ``Image`` column to ``decode=False`` (we decode ourselves)."""
    features = getattr(ds, "features", None)
    columns = getattr(ds, "column_names", None) or (list(features) if features else None)
    captions = caption_columns(caption_column)
    if columns is not None:
        if image_column not in columns:
            raise _missing_column_error("image", image_column, columns)
        for caption in captions:
            if caption not in columns:
                raise _missing_column_error("caption", caption, columns)
    if features is not None:
        import datasets

        if isinstance(features.get(image_column), datasets.Image) and features[image_column].decode:
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        if select and hasattr(ds, "select_columns") and len(columns) > 1 + len(captions):
            ds = ds.select_columns([image_column, *captions])
    return ds


class _TransformedDataset:
    """What the map-style and streaming (data/streaming.py) datasets share: their :class:`Text2ImageTransform`."""

    transform: "Text2ImageTransform"

    @property
    def resolution(self) -> int:
        return self.transform.resolution

    @property
    def collate_fn(self) -> "Text2ImageCollator":
        """A collate function that knows the resolution (gives ``[0, 3, R, R]`` when all are bad)."""
        return Text2ImageCollator(self.resolution)

    def set_epoch(self, epoch: int) -> None:
        """Vary random crops / flips between epochs (they are seeded by seed, epoch and index)."""
        self.transform.set_epoch(epoch)


class Text2ImageDataset(_TransformedDataset, torch.utils.data.Dataset):
    """Map-style text-to-image dataset over a `datasets` ``Dataset`` (or a list of row dicts).

    ``dataset[i]`` is ``{"pixel_values": Tensor[3, R, R] in [-1, 1], "caption": str, "index": i}``
    or, for an undecodable / truncated / zero-byte image or a missing / empty caption,
    ``{"index": i, "bad_reason": "<reason>"}``. Use :attr:`collate_fn` (or
    :func:`collate_text2image`) in the DataLoader to drop and report bad samples.
    ``data_dir`` resolves relative image paths; ``seed`` seeds random crops and flips.
    """

    def __init__(
        self,
        hf_dataset,
        resolution: int,
        image_column: str = "image",
        caption_column: str = "llava",
        center_crop: bool = True,
        random_flip: bool = False,
        data_dir: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(hf_dataset, list):
            columns = set().union(*(r.keys() for r in hf_dataset)) if hf_dataset else set()
            if hf_dataset and image_column not in columns:
                raise _missing_column_error("image", image_column, columns)
            for caption in caption_columns(caption_column) if hf_dataset else ():
                if caption not in columns:
                    raise _missing_column_error("caption", caption, columns)
        else:
            hf_dataset = _prepare_hf(hf_dataset, image_column, caption_column)
        if len(hf_dataset) == 0:
            raise ValueError("the dataset has 0 rows; check the data path and the split")
        self.dataset = hf_dataset
        self.transform = Text2ImageTransform(
            resolution, image_column, caption_column, center_crop, random_flip, data_dir, seed
        )


    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        n = len(self.dataset)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} rows")
        try:
            row = self.dataset[int(index)]
        except Exception as e:  # e.g. an undecodable cell in another feature type
            return {"index": int(index), "bad_reason": f"unreadable row: {type(e).__name__}: {e}"[:200]}
        return self.transform(row, int(index))


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------


def collate_text2image(samples: list[dict], resolution: int | None = None) -> dict:
    """Stack the good samples; report the bad ones.

    Returns ``{"pixel_values": Tensor[B, 3, R, R], "captions": list[str], "indices": list[int],
    "bad_indices": list[int], "bad_reasons": list[str]}``. ``B`` is the number of good samples
    and may be 0: then ``pixel_values`` has shape ``[0, 3, R, R]`` with ``R = resolution``, or
    ``[0, 3, 0, 0]`` if no resolution is given (prefer :class:`Text2ImageCollator`).
    """
    good = [s for s in samples if "bad_reason" not in s]
    bad = [s for s in samples if "bad_reason" in s]
    if good:
        pixel_values = torch.stack([s["pixel_values"] for s in good])
    else:
        r = resolution or 0
        pixel_values = torch.empty((0, 3, r, r), dtype=torch.float32)
    return {
        "pixel_values": pixel_values,
        "captions": [s["caption"] for s in good],
        "indices": [int(s["index"]) for s in good],
        "bad_indices": [int(s["index"]) for s in bad],
        "bad_reasons": [s["bad_reason"] for s in bad],
    }


class Text2ImageCollator:
    """Picklable collate function holding the resolution (so an all-bad batch has the right shape)."""

    def __init__(self, resolution: int) -> None:
        self.resolution = resolution

    def __call__(self, samples: list[dict]) -> dict:
        return collate_text2image(samples, self.resolution)

    def __repr__(self) -> str:
        return f"Text2ImageCollator(resolution={self.resolution})"
