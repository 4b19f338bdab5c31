"""Procedural "shapes" text-image world with GenEval-style captions and metadata.

Images are small RGB squares (64x64 by default) showing 1-4 flat, non-overlapping shapes
(circle, square, triangle) in six well-separated colours on a uniform dark-grey background.
Every image comes with a caption phrased like a GenEval prompt and the matching GenEval metadata
(``{"tag", "include": [...], "exclude": [...]?, "prompt"}``), so a model trained on this world can
be evaluated with the GenEval protocol by :mod:`evaluation.shapes.scorer` on a CPU.

The "class" of an object is its shape; objects always carry a colour, so the metadata of every
tag names the colour too (``"color"``). Tags, as in GenEval:

* ``single_object``: "a photo of a red circle"
* ``two_object``:    "a photo of a red circle and a blue square"        (two different shapes)
* ``counting``:      "a photo of three blue squares"                    (2-4; exclude count+1)
* ``colors``:        "a photo of a yellow triangle"
* ``position``:      "a photo of a green triangle left of a red circle" (include[1] has
  ``"position": ["left of", 0]``: it is left of include[0], exactly as in GenEval's file)
* ``color_attr``:    "a photo of a red square and a green circle"       (different shapes and colours)

A fixed share of the prompt strings (chosen by a hash of the prompt, independent of any seed) is
held out: :func:`make_dataset` never uses them and :func:`make_heldout_metadata` draws only from
them, so evaluation prompts are unseen combinations. The held-out prompts that the report set
(:func:`heldout_specs`) does not use form the **validation** set (:func:`validation_specs`), where
schedules are chosen (:mod:`evaluation.shapes.sweep`) without touching the reported prompts.

CLI::

    python -m evaluation.shapes.domain --output_dir OUT --num_images 20000 --resolution 64 --seed 0
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
#: Palette; every pair (background included) is more than 170 apart in RGB distance.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 210, 50),
    "blue": (30, 90, 255),
    "yellow": (250, 230, 30),
    "purple": (200, 40, 210),
    "white": (245, 245, 245),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (40, 40, 40)
#: GenEval's tags, in the order of its metadata file.
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
COUNTS: tuple[int, ...] = (2, 3, 4)

#: Shape side length as a fraction of the image side (14-22 px at 64x64).
SIZE_RANGE = (14 / 64, 22 / 64)
#: Minimum empty gap between two shapes' bounding boxes, as a fraction of the image side.
MARGIN = 3 / 64
#: Rendered position prompts put the centres at least this far apart along the relation's axis
#: (fraction of the image side), with the perpendicular offset at most half the axial one.
POSITION_MIN_OFFSET = 0.2
#: GenEval's ``position_threshold``: box-centre offsets are reduced by this times the summed box
#: dimensions before the direction test.
POSITION_THRESHOLD = 0.1
#: Share of each prompt family held out from training.
HELDOUT_FRACTION = 0.2


# --------------------------------------------------------------------------------------------
# Scenes


@dataclass
class ShapeObject:
    """One drawn shape: ``center`` = (x, y) of its bounding-box centre in pixel units (pixel i
    spans [i, i+1)), ``size`` = side of its square bounding box in pixels."""

    shape: str
    color: str
    center: tuple[float, float]
    size: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Bounding box (x0, y0, x1, y1) with exclusive right/bottom edges."""
        cx, cy = self.center
        h = self.size / 2
        return (cx - h, cy - h, cx + h, cy + h)


@dataclass
class Scene:
    """What an image shows: its objects, in the order of the metadata's include entries."""

    objects: list[ShapeObject] = field(default_factory=list)
    resolution: int = 64

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """Relations of box A relative to box B under GenEval's rule.

    Boxes are (x0, y0, x1, y1), y pointing down. The centre offset A-B is shrunk towards zero by
    ``threshold`` times the two boxes' summed width (x) / height (y); a relation holds when the
    shrunk offset, divided by the length of the raw offset, exceeds 0.5 along that direction.
    """
    ax0, ay0, ax1, ay1 = (float(v) for v in box_a[:4])
    bx0, by0, bx1, by1 = (float(v) for v in box_b[:4])
    off_x = (ax0 + ax1) / 2 - (bx0 + bx1) / 2
    off_y = (ay0 + ay1) / 2 - (by0 + by1) / 2
    slack_x = threshold * ((ax1 - ax0) + (bx1 - bx0))
    slack_y = threshold * ((ay1 - ay0) + (by1 - by0))
    red_x = math.copysign(max(abs(off_x) - slack_x, 0.0), off_x)
    red_y = math.copysign(max(abs(off_y) - slack_y, 0.0), off_y)
    if abs(red_x) < 1e-3 and abs(red_y) < 1e-3:
        return set()
    norm = math.hypot(off_x, off_y)
    ux, uy = red_x / norm, red_y / norm
    found = set()
    if ux < -0.5:
        found.add("left of")
    if ux > 0.5:
        found.add("right of")
    if uy < -0.5:
        found.add("above")
    if uy > 0.5:
        found.add("below")
    return found


# --------------------------------------------------------------------------------------------
# Prompts and metadata


def _obj(shape: str, color: str, count: int = 1) -> dict[str, Any]:
    return {"class": shape, "count": count, "color": color}


def make_spec(tag: str, *args: Any) -> dict[str, Any]:
    """GenEval metadata for one prompt of ``tag``.

    Arguments per tag: single_object/colors ``(shape, color)``; two_object/color_attr
    ``(shape1, color1, shape2, color2)``; counting ``(shape, color, count)``; position
    ``(subject_shape, subject_color, relation, reference_shape, reference_color)``.
    """
    if tag in ("single_object", "colors"):
        shape, color = args
        return {"tag": tag, "include": [_obj(shape, color)], "prompt": f"a photo of a {color} {shape}"}
    if tag in ("two_object", "color_attr"):
        s1, c1, s2, c2 = args
        return {
            "tag": tag,
            "include": [_obj(s1, c1), _obj(s2, c2)],
            "prompt": f"a photo of a {c1} {s1} and a {c2} {s2}",
        }
    if tag == "counting":
        shape, color, count = args
        return {
            "tag": tag,
            "include": [_obj(shape, color, count)],
            "exclude": [{"class": shape, "count": count + 1}],
            "prompt": f"a photo of {NUMBER_WORDS[count]} {color} {PLURALS[shape]}",
        }
    if tag == "position":
        s_sub, c_sub, rel, s_ref, c_ref = args
        subject = _obj(s_sub, c_sub)
        subject["position"] = [rel, 0]
        return {
            "tag": tag,
            "include": [_obj(s_ref, c_ref), subject],
            "prompt": f"a photo of a {c_sub} {s_sub} {rel} a {c_ref} {s_ref}",
        }
    raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")


def _space_args(tag: str) -> list[tuple]:
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    if tag in ("single_object", "colors"):
        return pairs
    if tag == "two_object":
        return [(s1, c1, s2, c2) for s1, c1 in pairs for s2, c2 in pairs if s1 != s2]
    if tag == "color_attr":
        return [(s1, c1, s2, c2) for s1, c1 in pairs for s2, c2 in pairs if s1 != s2 and c1 != c2]
    if tag == "counting":
        return [(s, c, n) for s, c in pairs for n in COUNTS]
    if tag == "position":
        return [(a[0], a[1], rel, b[0], b[1]) for a in pairs for b in pairs if a != b for rel in RELATIONS]
    raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")


#: Tags whose prompt strings come from the same family (identical wording) share one split.
_FAMILY = {"single_object": "single_object", "colors": "single_object",
           "two_object": "two_object", "color_attr": "two_object",
           "counting": "counting", "position": "position"}


def _hash(prompt: str) -> bytes:
    return hashlib.sha256(prompt.encode("utf-8")).digest()


@lru_cache(maxsize=None)
def _heldout_prompts(family: str) -> frozenset[str]:
    prompts = sorted({make_spec(family, *a)["prompt"] for a in _space_args(family)}, key=_hash)
    return frozenset(prompts[: math.ceil(HELDOUT_FRACTION * len(prompts))])


@lru_cache(maxsize=None)
def prompt_space(tag: str, split: str = "all") -> tuple[tuple, ...]:
    """All argument tuples of ``tag`` (for :func:`make_spec`) in ``split``: all/train/heldout."""
    if split not in ("all", "train", "heldout"):
        raise ValueError(f"split must be 'all', 'train' or 'heldout', got {split!r}")
    args = _space_args(tag)
    if split == "all":
        return tuple(args)
    held = _heldout_prompts(_FAMILY[tag])
    want = split == "heldout"
    return tuple(a for a in args if (make_spec(tag, *a)["prompt"] in held) == want)


def is_heldout(prompt: str, tag: str) -> bool:
    """Whether ``prompt`` is one of the held-out prompts of ``tag``'s family."""
    return prompt in _heldout_prompts(_FAMILY[tag])


def sample_spec(tag: str, rng: np.random.Generator, split: str = "all") -> dict[str, Any]:
    """Draw a random GenEval-style metadata dict ``{"tag", "include", ["exclude"], "prompt"}``.

    ``split`` restricts the draw to the training prompts ("train"), the held-out prompts
    ("heldout") or neither ("all").
    """
    space = prompt_space(tag, split)
    return make_spec(tag, *space[int(rng.integers(len(space)))])


# --------------------------------------------------------------------------------------------
# Rendering


def _scaled(res: int) -> tuple[int, int, int, int]:
    lo = max(3, round(SIZE_RANGE[0] * res))
    hi = max(lo, round(SIZE_RANGE[1] * res))
    margin = max(1, round(MARGIN * res))
    border = max(1, round(res / 64))
    return lo, hi, margin, border


def _apart(a: tuple[int, int, int], b: tuple[int, int, int], margin: int) -> bool:
    ax, ay, sa = a
    bx, by, sb = b
    return (ax >= bx + sb + margin or bx >= ax + sa + margin
            or ay >= by + sb + margin or by >= ay + sa + margin)


def _relation_ok(sub: tuple[int, int, int], ref: tuple[int, int, int], rel: str, res: int) -> bool:
    sx, sy, ss = sub
    rx, ry, rs = ref
    dx = (sx + ss / 2) - (rx + rs / 2)
    dy = (sy + ss / 2) - (ry + rs / 2)
    along, perp = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[rel]
    if along < POSITION_MIN_OFFSET * res or abs(perp) > 0.5 * along:
        return False
    return rel in relative_position((sx, sy, sx + ss, sy + ss), (rx, ry, rx + rs, ry + rs))


def _layout(sizes: list[int], rng: np.random.Generator, res: int, margin: int, border: int,
            relation: Optional[str]) -> Optional[list[tuple[int, int, int]]]:
    """Top-left corners for shapes of the given sizes, or None if random placement failed."""
    for _ in range(100):
        placed: list[tuple[int, int, int]] = []
        for k, s in enumerate(sizes):
            hi = res - border - s + 1
            for _ in range(40):
                x, y = (int(v) for v in rng.integers(border, hi, size=2))
                cand = (x, y, s)
                if not all(_apart(cand, p, margin) for p in placed):
                    continue
                if relation is not None and k == 1 and not _relation_ok(cand, placed[0], relation, res):
                    continue
                placed.append(cand)
                break
            else:
                break
        if len(placed) == len(sizes):
            return placed
    return None


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, s: int, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([x, y, x + s - 1, y + s - 1], fill=fill)
    elif shape == "square":
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y + s - 1), (x + s - 1, y + s - 1), (x + (s - 1) / 2, y)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(metadata: dict[str, Any], rng: np.random.Generator, resolution: int = 64) -> tuple[Image.Image, Scene]:
    """Draw an image that satisfies GenEval-style ``metadata``; returns ``(image, scene)``.

    Every include entry contributes ``count`` shapes of its ``class`` in its ``color`` (a random
    palette colour when absent); nothing else is drawn, so ``exclude`` entries hold trivially.
    A ``position`` entry ``[relation, j]`` is honoured against the (single) object of include[j]
    with a clear margin: centre offset along the axis >= 20 % of the image side, perpendicular
    offset at most half of that, and GenEval's relation test passes.
    """
    res = int(resolution)
    lo, hi, margin, border = _scaled(res)
    objects: list[tuple[str, str]] = []
    relation: Optional[str] = None
    for k, req in enumerate(metadata["include"]):
        shape = req["class"]
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r} in metadata; expected one of {SHAPES}")
        color = req.get("color") or COLORS[int(rng.integers(len(COLORS)))]
        if color not in PALETTE:
            raise ValueError(f"unknown colour {color!r} in metadata; expected one of {COLORS}")
        if "position" in req:
            rel, target = req["position"]
            if k != 1 or target != 0 or req.get("count", 1) != 1 or metadata["include"][0].get("count", 1) != 1:
                raise ValueError("position is supported only as include[1] relative to include[0], one object each")
            if rel not in RELATIONS:
                raise ValueError(f"unknown relation {rel!r}; expected one of {RELATIONS}")
            relation = rel
        objects.extend([(shape, color)] * int(req.get("count", 1)))

    while True:
        sizes = [int(rng.integers(lo, hi + 1)) for _ in objects]
        corners = _layout(sizes, rng, res, margin, border, relation)
        if corners is not None:
            break
        hi = max(lo, hi - 1)  # crowded: retry with smaller shapes
        if hi == lo and lo > 3:
            lo -= 1

    image = Image.new("RGB", (res, res), BACKGROUND)
    draw = ImageDraw.Draw(image)
    scene = Scene(resolution=res)
    for (shape, color), (x, y, s) in zip(objects, corners):
        _draw(draw, shape, x, y, s, PALETTE[color])
        scene.objects.append(ShapeObject(shape, color, (x + s / 2, y + s / 2), s))
    return image, scene


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding used everywhere in this module (deterministic for a given Pillow)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Datasets and held-out metadata


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="img", mininterval=0.5)


def generate_examples(num_images: int, resolution: int = 64, seed: int = 0, split: str = "train",
                      progress: bool = False) -> list[dict[str, Any]]:
    """Rows ``{"image": {"bytes", "path"}, "llava": caption, "metadata": json}``, tags balanced
    (counts differ by at most one) and shuffled; fully determined by ``seed``."""
    rng = np.random.default_rng(seed)
    tags = np.arange(num_images) % len(TAGS)
    tags = tags[rng.permutation(num_images)]
    rows = []
    for i in _progress(range(num_images), num_images, "rendering shapes", progress):
        spec = sample_spec(TAGS[int(tags[i])], rng, split)
        image, _ = render(spec, rng, resolution)
        rows.append({
            "image": {"bytes": png_bytes(image), "path": f"{i:07d}.png"},
            "llava": spec["prompt"],
            "metadata": json.dumps(spec),
        })
    return rows


def dataset_features():
    """``datasets.Features`` of the parquet written by :func:`make_dataset`."""
    from datasets import Features, Image as ImageFeature, Value

    return Features({"image": ImageFeature(), "llava": Value("string"), "metadata": Value("string")})


def make_dataset(out_dir: Union[str, Path], num_images: int, resolution: int = 64, seed: int = 0,
                 progress: bool = True) -> Path:
    """Write ``out_dir/train.parquet``: ``num_images`` rendered training images (held-out prompts
    excluded), balanced over the six tags, loadable with
    ``datasets.load_dataset("parquet", data_files=...)``. Image bytes are embedded.
    Returns the parquet path."""
    from datasets import Dataset

    if num_images <= 0:
        raise ValueError("num_images must be positive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = generate_examples(num_images, resolution, seed, "train", progress)
    columns = {key: [row[key] for row in rows] for key in ("image", "llava", "metadata")}
    ds = Dataset.from_dict(columns, features=dataset_features())
    path = out_dir / "train.parquet"
    import datasets

    silence = not progress and not datasets.are_progress_bars_disabled()
    if silence:
        datasets.disable_progress_bars()
    try:
        ds.to_parquet(str(path))
    finally:
        if silence:
            datasets.enable_progress_bars()
    return path


def heldout_specs(num_prompts_per_tag: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """Held-out metadata, ``num_prompts_per_tag`` per tag in GenEval's tag order. Prompts are
    distinct while a tag's held-out pool lasts; beyond that the pool is cycled (reshuffled)."""
    rng = np.random.default_rng([seed, 0x5EED])
    specs = []
    for tag in TAGS:
        pool = prompt_space(tag, "heldout")
        if not pool:
            raise RuntimeError(f"no held-out prompts for {tag}")
        chosen: list[int] = []
        while len(chosen) < num_prompts_per_tag:
            chosen.extend(int(i) for i in rng.permutation(len(pool)))
        specs.extend(make_spec(tag, *pool[i]) for i in chosen[:num_prompts_per_tag])
    return specs


def validation_specs(num_prompts_per_tag: int = 20, seed: int = 0,
                     report_prompts_per_tag: int = 20) -> list[dict[str, Any]]:
    """Validation metadata, disjoint from the training prompts *and* from the report set
    ``heldout_specs(report_prompts_per_tag, seed)``: per tag (GenEval's tag order), up to
    ``num_prompts_per_tag`` distinct held-out prompts whose strings the report set does not use, drawn with
    their own random stream (the report set is the same with or without a validation set).

    The held-out pools are small for the small prompt families (single object/colours: 18 strings, 4 held
    out; counting: 54, 11 held out), so a tag whose held-out prompts the report set uses up gets none and
    validation scores average the tags it covers (:func:`validation_coverage`).
    """
    report = {spec["prompt"] for spec in heldout_specs(report_prompts_per_tag, seed)}
    rng = np.random.default_rng([seed, 0x7A11D])
    specs = []
    for tag in TAGS:
        pool = [a for a in prompt_space(tag, "heldout") if make_spec(tag, *a)["prompt"] not in report]
        order = rng.permutation(len(pool))[:num_prompts_per_tag]
        specs.extend(make_spec(tag, *pool[int(i)]) for i in order)
    return specs


def validation_coverage(specs: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Prompts per tag of a metadata list (0 for a tag it lacks), in GenEval's tag order."""
    return {tag: sum(s["tag"] == tag for s in specs) for tag in TAGS}


def _write_metadata(path: Union[str, Path], specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(s) + "\n" for s in specs), encoding="utf-8")
    return specs


def make_heldout_metadata(path: Union[str, Path], num_prompts_per_tag: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """Write a GenEval-format metadata jsonl of held-out prompts (see :func:`heldout_specs`)."""
    return _write_metadata(path, heldout_specs(num_prompts_per_tag, seed))


def make_validation_metadata(path: Union[str, Path], num_prompts_per_tag: int = 20, seed: int = 0,
                             report_prompts_per_tag: int = 20) -> list[dict[str, Any]]:
    """Write a GenEval-format metadata jsonl of validation prompts (see :func:`validation_specs`)."""
    return _write_metadata(path, validation_specs(num_prompts_per_tag, seed, report_prompts_per_tag))


def write_reference_folder(metadata: Sequence[dict[str, Any]], root: Union[str, Path], n_samples: int = 4,
                           resolution: int = 64, seed: int = 0) -> Path:
    """Render ground-truth images for ``metadata`` into a GenEval-layout folder (the scorer's
    upper bound / sanity check)."""
    from evaluation.geneval_layout import sample_path, write_prompt_metadata

    rng = np.random.default_rng(seed)
    root = Path(root)
    for index, spec in enumerate(metadata):
        write_prompt_metadata(root, index, spec)
        for k in range(n_samples):
            image, _ = render(spec, rng, resolution)
            image.save(sample_path(root, index, k))
    return root


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.shapes.domain",
        description="Build the procedural shapes text-image dataset (train.parquet) and held-out "
        "GenEval-format metadata (heldout_metadata.jsonl; with --validation_prompts_per_tag also a disjoint "
        "validation_metadata.jsonl).",
    )
    parser.add_argument("--output_dir", required=True, help="folder to write train.parquet and heldout_metadata.jsonl into")
    parser.add_argument("--num_images", type=int, default=20000, help="number of training images (default 20000)")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels; shape sizes scale with it (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives byte-identical output (default 0)")
    parser.add_argument("--heldout_prompts_per_tag", type=int, default=20,
                        help="held-out evaluation prompts per GenEval tag (default 20; six tags)")
    parser.add_argument("--validation_prompts_per_tag", type=int, default=0,
                        help="also write validation_metadata.jsonl: up to this many prompts per tag, held out from "
                             "training and disjoint from heldout_metadata.jsonl (for choosing schedules; tags whose "
                             "held-out prompts the report set uses up get none; default 0: no file)")
    parser.add_argument("--no_progress", action="store_true", help="disable the progress bar")
    args = parser.parse_args(argv)
    if args.validation_prompts_per_tag < 0:
        parser.error("--validation_prompts_per_tag must be >= 0")
    out = Path(args.output_dir)
    path = make_dataset(out, args.num_images, args.resolution, args.seed, progress=not args.no_progress)
    specs = make_heldout_metadata(out / "heldout_metadata.jsonl", args.heldout_prompts_per_tag, args.seed)
    print(f"wrote {path} ({args.num_images} images, {args.resolution}x{args.resolution}) and "
          f"{out / 'heldout_metadata.jsonl'} ({len(specs)} prompts)")
    if args.validation_prompts_per_tag:
        val = make_validation_metadata(out / "validation_metadata.jsonl", args.validation_prompts_per_tag, args.seed,
                                       args.heldout_prompts_per_tag)
        per_tag = ", ".join(f"{tag} {n}" for tag, n in validation_coverage(val).items())
        print(f"wrote {out / 'validation_metadata.jsonl'} ({len(val)} prompts: {per_tag})")
    return 0


if __name__ == "__main__":
    from training.cli import run_cli

    sys.exit(run_cli(main))  # bad input: one line, status 2
