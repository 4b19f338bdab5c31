"""GenEval-style scorer for the shapes world: no detector network, just pixels and geometry.

For every image of a GenEval-layout folder (``<dir>/<digits>/metadata.jsonl`` holding one JSON
object, ``<dir>/<digits>/samples/<digits>.png``) it

1. labels each pixel with the nearest palette colour when it is more that colour than background
   (a blend past the 50 % mark) and within ``color_tolerance`` of it, otherwise with none;
2. splits each colour into 8-connected components (a vectorised union-find in numpy) and drops
   components smaller than ``min_area`` (a fraction of the image area);
3. names each component's shape from its geometry: the bounding box's aspect ratio (long/short
   side) must be at most ``max_aspect``; the fill ratio area/(w*h) is ~1 for a square, ~pi/4 for a
   circle and ~1/2 for a triangle, and an upright triangle's centroid sits h/6 below its box
   centre (0 for circles and squares). Boundaries are the midpoints between the ideal values;
   the centroid offset keeps triangles apart from circles when blur rounds them off;
4. checks the metadata like GenEval's ``evaluate_images.py``: every ``include`` entry needs
   ``count`` objects of its class (in its ``color`` when given); ``position: [rel, j]`` must hold
   between each of those objects and each object matched for include[j], using GenEval's box rule
   with ``position_threshold`` (0.1); any ``exclude`` entry with ``count`` or more objects fails.

Deviation from GenEval, forced by the absence of detector confidences: objects of a class are
ordered by area (largest first), and a colour requirement selects objects *of that colour*
instead of testing the colour of the ``count`` most confident detections.

Rows of the results jsonl have GenEval's keys: filename, tag, prompt, correct, reason, metadata
(JSON string), details (JSON string: detected boxes per class).

CLI::

    python -m evaluation.shapes.scorer IMAGE_DIR --outfile results.jsonl [--json summary.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image

from evaluation.geneval_layout import METADATA_NAME, SAMPLE_NAME
from evaluation.shapes.domain import BACKGROUND, COLORS, PALETTE, POSITION_THRESHOLD, SHAPES, relative_position

_REFS = np.array([BACKGROUND] + [PALETTE[c] for c in COLORS], dtype=np.float32)  # row 0 = background
_MIN_REF_DISTANCE = float(min(
    np.linalg.norm(_REFS[i] - _REFS[j]) for i in range(len(_REFS)) for j in range(i + 1, len(_REFS))
))

#: Default colour tolerance: 0.4 x the smallest distance between two reference colours (~68).
COLOR_TOLERANCE = 0.4 * _MIN_REF_DISTANCE
#: Components smaller than this fraction of the image area are ignored (16 px at 64x64).
MIN_AREA = 16 / 64**2
#: Bounding boxes longer than this ratio of their short side are not a shape.
MAX_ASPECT = 1.6
#: Fill-ratio boundaries, midway between the ideal shapes: square (1) / circle (pi/4) / triangle (1/2).
SQUARE_FILL = (1 + np.pi / 4) / 2
CIRCLE_FILL = (np.pi / 4 + 0.5) / 2
#: Components sparser than this are not a shape.
MIN_FILL = 0.35
#: |centroid y - box centre y| / box height above this means triangle (ideal 1/6, others 0).
TRIANGLE_OFFSET = 1 / 12
RESULT_KEYS = ("filename", "tag", "prompt", "correct", "reason", "metadata", "details")


@dataclass
class Detection:
    """One connected component: ``box`` = (x0, y0, x1, y1), right/bottom exclusive."""

    shape: Optional[str]  # None when the geometry matches no shape
    color: str
    area: int
    box: tuple[int, int, int, int]
    fill: float
    aspect: float
    offset: float  # (centroid y - box centre y) / box height


def load_image(image: Union[str, Path, Image.Image, np.ndarray], resolution: Optional[int] = None) -> np.ndarray:
    """RGB uint8 array (H, W, 3); resized with NEAREST to ``resolution`` x ``resolution`` if given."""
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    elif not isinstance(image, Image.Image):
        with Image.open(image) as im:
            image = im.convert("RGB")
    image = image.convert("RGB")
    if resolution is not None and image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.NEAREST)
    return np.asarray(image, dtype=np.uint8)


def color_labels(pixels: np.ndarray, color_tolerance: float = COLOR_TOLERANCE) -> np.ndarray:
    """Index into :data:`COLORS` per pixel, -1 for background or colours far from the palette.

    A pixel counts as colour c when it lies within ``color_tolerance`` of the segment from the
    background-c midpoint to c itself, i.e. it is more c than background (anti-aliased or blurred
    edges are cut at the 50 % mix, so blur does not change a shape's extent) and not off-palette.
    Between two colours the nearer segment wins.
    """
    p = pixels.astype(np.float32)[:, :, None, :] - _REFS[0]  # (H, W, 1, 3), relative to background
    c = _REFS[1:] - _REFS[0]  # (6, 3)
    mix = (p * c).sum(-1) / (c * c).sum(-1)  # (H, W, 6): share of colour c along background -> c
    point = np.clip(mix, 0.5, 1.0)[..., None] * c
    dist = np.sqrt(((p - point) ** 2).sum(-1))
    nearest = dist.argmin(-1)
    best_mix = np.take_along_axis(mix, nearest[..., None], -1)[..., 0]
    ok = (best_mix >= 0.5) & (dist.min(-1) <= color_tolerance)
    return np.where(ok, nearest, -1).astype(np.int64)


def connected_components(labels: np.ndarray) -> np.ndarray:
    """8-connected components of equal, non-negative labels; returns a root index per pixel
    (the smallest flat index in its component) and -1 where ``labels < 0``."""
    h, w = labels.shape
    flat = labels.ravel()
    index = np.arange(h * w).reshape(h, w)
    us, vs = [], []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        c0, c1 = max(0, -dx), w - max(0, dx)
        a = index[0:h - dy, c0:c1].ravel()
        b = index[dy:h, c0 + dx:c1 + dx].ravel()
        keep = (flat[a] >= 0) & (flat[a] == flat[b])
        us.append(a[keep])
        vs.append(b[keep])
    u = np.concatenate(us)
    v = np.concatenate(vs)
    parent = np.arange(h * w)
    while u.size:
        pu, pv = parent[u], parent[v]  # roots: parent is fully compressed here
        open_ = pu != pv
        u, v, pu, pv = u[open_], v[open_], pu[open_], pv[open_]
        if not u.size:
            break
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))  # hook larger root under smaller
        while True:  # pointer jumping until every node points at its root
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return np.where(flat >= 0, parent, -1).reshape(h, w)


def classify_shape(fill: float, aspect: float, offset: float = 0.0, max_aspect: float = MAX_ASPECT) -> Optional[str]:
    """Shape name from bounding-box fill ratio, aspect ratio and vertical centroid offset
    (None: not a shape)."""
    if aspect > max_aspect or fill < MIN_FILL:
        return None
    if abs(offset) >= TRIANGLE_OFFSET or fill < CIRCLE_FILL:
        return "triangle"
    if fill >= SQUARE_FILL:
        return "square"
    return "circle"


def detect(
    image: Union[str, Path, Image.Image, np.ndarray],
    color_tolerance: float = COLOR_TOLERANCE,
    min_area: float = MIN_AREA,
    max_aspect: float = MAX_ASPECT,
    resolution: Optional[int] = None,
) -> tuple[list[Detection], tuple[int, int]]:
    """Detected shapes (largest first) and the (width, height) they were measured at."""
    pixels = load_image(image, resolution)
    h, w = pixels.shape[:2]
    labels = color_labels(pixels, color_tolerance)
    roots = connected_components(labels).ravel()
    fg = np.flatnonzero(roots >= 0)
    if not fg.size:
        return [], (w, h)
    comp_roots, comp = np.unique(roots[fg], return_inverse=True)
    n = comp_roots.size
    ys, xs = np.divmod(fg, w)
    area = np.bincount(comp, minlength=n)
    mean_y = np.bincount(comp, weights=ys, minlength=n) / area + 0.5  # pixel centres
    x0 = np.full(n, w)
    y0 = np.full(n, h)
    x1 = np.zeros(n, dtype=np.int64)
    y1 = np.zeros(n, dtype=np.int64)
    np.minimum.at(x0, comp, xs)
    np.minimum.at(y0, comp, ys)
    np.maximum.at(x1, comp, xs + 1)
    np.maximum.at(y1, comp, ys + 1)
    colors = labels.ravel()[comp_roots]
    threshold = min_area * h * w
    found = []
    for k in range(n):
        if area[k] < threshold:
            continue
        bw, bh = int(x1[k] - x0[k]), int(y1[k] - y0[k])
        fill = float(area[k]) / (bw * bh)
        aspect = max(bw, bh) / min(bw, bh)
        offset = float(mean_y[k] - (y0[k] + y1[k]) / 2) / bh
        found.append(Detection(
            shape=classify_shape(fill, aspect, offset, max_aspect),
            color=COLORS[int(colors[k])],
            area=int(area[k]),
            box=(int(x0[k]), int(y0[k]), int(x1[k]), int(y1[k])),
            fill=fill,
            aspect=aspect,
            offset=offset,
        ))
    found.sort(key=lambda d: (-d.area, d.box))
    return found, (w, h)


def _describe(objs: list[Detection]) -> str:
    counts: dict[str, int] = {}
    for d in objs:
        key = f"{d.color} {d.shape}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in counts.items()) or "nothing"


def evaluate(detections: list[Detection], metadata: dict[str, Any],
             position_threshold: float = POSITION_THRESHOLD) -> tuple[bool, str]:
    """(correct, reason) of detections against GenEval metadata (include AND, exclude OR)."""
    by_class: dict[str, list[Detection]] = {}
    for d in detections:
        if d.shape is not None:
            by_class.setdefault(d.shape, []).append(d)
    correct = True
    reasons: list[str] = []
    groups: list[Optional[list[Detection]]] = []
    for req in metadata.get("include", []):
        cls, count, color = req["class"], int(req["count"]), req.get("color")
        of_class = by_class.get(cls, [])
        candidates = [d for d in of_class if color is None or d.color == color]
        found = candidates[:count]
        matched = True
        if len(found) < count:
            matched = False
            want = f"{color} {cls}" if color else cls
            reasons.append(f"expected {want}>={count}, found {len(candidates)}; classes found: {_describe(of_class)}")
        elif "position" in req:
            rel, target = req["position"]
            targets = groups[target] if 0 <= target < len(groups) else None
            if targets is None:
                matched = False
                reasons.append(f"no target for {cls} to be {rel}")
            else:
                for obj in found:
                    for ref in targets:
                        rels = relative_position(obj.box, ref.box, position_threshold)
                        if rel not in rels:
                            matched = False
                            reasons.append(f"expected {cls} {rel} target, found {' and '.join(sorted(rels)) or 'no relation to'} target")
                            break
                    if not matched:
                        break
        correct &= matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        cls, count, color = req["class"], int(req["count"]), req.get("color")
        n = sum(1 for d in by_class.get(cls, []) if color is None or d.color == color)
        if n >= count:
            correct = False
            want = f"{color} {cls}" if color else cls
            reasons.append(f"expected {want}<{count}, found {n}")
    return correct, "\n".join(reasons)


def score_image(path: Union[str, Path], metadata: dict[str, Any], *, color_tolerance: float = COLOR_TOLERANCE,
                min_area: float = MIN_AREA, max_aspect: float = MAX_ASPECT, resolution: Optional[int] = None,
                position_threshold: float = POSITION_THRESHOLD) -> dict[str, Any]:
    """One GenEval results row for the image at ``path``."""
    detections, _ = detect(path, color_tolerance, min_area, max_aspect, resolution)
    correct, reason = evaluate(detections, metadata, position_threshold)
    details: dict[str, list] = {}
    for d in detections:
        details.setdefault(d.shape or "unknown", []).append(
            {"box": list(d.box), "color": d.color, "area": d.area, "fill": round(d.fill, 3)}
        )
    return {
        "filename": str(path),
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": bool(correct),
        "reason": reason,
        "metadata": json.dumps(metadata),
        "details": json.dumps(details),
    }


def iter_folder(image_dir: Union[str, Path]):
    """Yield ``(image_path, metadata)`` the way GenEval walks a folder (sorted for determinism)."""
    image_dir = Path(image_dir)
    for sub in sorted(os.listdir(image_dir)):
        folder = image_dir / sub
        if not sub.isdigit() or not folder.is_dir():
            continue
        with open(folder / METADATA_NAME, encoding="utf-8") as fh:
            metadata = json.load(fh)
        samples = folder / "samples"
        if not samples.is_dir():
            continue
        for name in sorted(os.listdir(samples)):
            if SAMPLE_NAME.match(name) and (samples / name).is_file():
                yield samples / name, metadata


def score_folder(image_dir: Union[str, Path], outfile: Union[None, str, Path] = None, **options: Any) -> list[dict[str, Any]]:
    """Score every sample of a GenEval-layout folder; optionally write the results jsonl."""
    rows = [score_image(path, metadata, **options) for path, metadata in iter_folder(image_dir)]
    if outfile is not None:
        outfile = Path(outfile)
        outfile.parent.mkdir(parents=True, exist_ok=True)
        with open(outfile, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    from evaluation.summarize_geneval import report_summary

    parser = argparse.ArgumentParser(
        prog="python -m evaluation.shapes.scorer",
        description="Score a GenEval-layout folder of shapes-world images and print GenEval's task table.",
    )
    parser.add_argument("image_dir", help="folder with <index>/metadata.jsonl and <index>/samples/<k>.png")
    parser.add_argument("--outfile", default="results.jsonl", help="results jsonl to write (GenEval format)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the summary as JSON here")
    parser.add_argument("--metadata", default=None,
                        help="metadata jsonl the folder was generated from; warns about missing folders/samples/prompts")
    parser.add_argument("--n_samples", type=int, default=4, help="samples expected per prompt for the --metadata check (default 4)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="resize images (NEAREST) to this square size before scoring; default: native size")
    parser.add_argument("--color_tolerance", type=float, default=COLOR_TOLERANCE,
                        help=f"max RGB distance to a palette colour (default {COLOR_TOLERANCE:.1f})")
    parser.add_argument("--min_area", type=float, default=MIN_AREA,
                        help=f"min component area as a fraction of the image (default {MIN_AREA:.5f})")
    parser.add_argument("--position_threshold", type=float, default=POSITION_THRESHOLD,
                        help="GenEval's position_threshold (default 0.1)")
    args = parser.parse_args(argv)
    if not Path(args.image_dir).is_dir():
        raise FileNotFoundError(f"image_dir {args.image_dir} is not a folder: pass the GenEval-layout folder a "
                                "sampler wrote (the --output_dir of test_sCM.py / test_meanflow.py / test_flux8b.py)")
    if args.metadata:
        from evaluation.geneval_layout import check_folder, read_metadata

        problems = check_folder(args.image_dir, read_metadata(args.metadata), args.n_samples)
        if problems:
            shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
            print(f"warning: {args.image_dir} is incomplete:\n  {shown}", file=sys.stderr)
    rows = score_folder(args.image_dir, args.outfile, color_tolerance=args.color_tolerance, min_area=args.min_area,
                        resolution=args.resolution, position_threshold=args.position_threshold)
    if not rows:
        print(f"no images found under {args.image_dir}", file=sys.stderr)
        return 1
    report_summary(args.outfile, args.metadata, args.json_out)
    return 0


if __name__ == "__main__":
    from training.cli import run_cli

    sys.exit(run_cli(main))  # bad input: one line, status 2
