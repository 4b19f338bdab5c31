"""The procedural shapes world: determinism, dataset format, held-out prompts, and the scorer."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.geneval_layout import check_folder, read_metadata, sample_path, write_prompt_metadata
from evaluation.shapes import domain, scorer
from evaluation.summarize_geneval import TASK_TAGS, summarize

GENEVAL_METADATA = Path(__file__).resolve().parents[1] / "evaluation" / "evaluation_metadata.jsonl"
GENEVAL_RESULT_KEYS = {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
N_SAMPLES = 4


# ------------------------------------------------------------------------------------ helpers


def _blur(a: np.ndarray) -> np.ndarray:
    p = np.pad(a.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = a.shape[:2]
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9


def _noise(a: np.ndarray, rng: np.random.Generator, sigma: float = 10.0) -> np.ndarray:
    return np.clip(a.astype(np.float32) + rng.normal(0.0, sigma, a.shape), 0, 255)


def _to_png(a: np.ndarray, path: Path) -> None:
    Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).save(path)


def _oracle(scene: domain.Scene, metadata: dict) -> bool:
    """Judge metadata against the scene the renderer reports (no pixels involved)."""
    dets = []
    for o in scene.objects:
        box = tuple(int(round(v)) for v in o.box)
        dets.append(scorer.Detection(o.shape, o.color, o.size ** 2, box, 1.0, 1.0, 0.0))
    dets.sort(key=lambda d: (-d.area, d.box))
    return scorer.evaluate(dets, metadata)[0]


def _accuracy(rows) -> tuple[float, dict[str, float]]:
    by_tag = defaultdict(list)
    for r in rows:
        by_tag[r["tag"]].append(r["correct"])
    per_tag = {t: float(np.mean(v)) for t, v in by_tag.items()}
    return float(np.mean([r["correct"] for r in rows])), per_tag


@pytest.fixture(scope="module")
def heldout():
    specs = domain.heldout_specs(num_prompts_per_tag=20, seed=0)
    return specs


@pytest.fixture(scope="module")
def rendered(heldout):
    """Ground-truth arrays and scenes: 120 held-out prompts x 4 samples at 64x64."""
    rng = np.random.default_rng(123)
    out = []
    for spec in heldout:
        samples = []
        for _ in range(N_SAMPLES):
            image, scene = domain.render(spec, rng, 64)
            samples.append((np.asarray(image), scene))
        out.append(samples)
    return out


def _write_folder(root: Path, metadata, rendered, transform=None, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for index, (spec, samples) in enumerate(zip(metadata, rendered)):
        write_prompt_metadata(root, index, spec)
        for k, (array, _) in enumerate(samples):
            _to_png(array if transform is None else transform(array, rng), sample_path(root, index, k))
    return root


# ------------------------------------------------------------------------------------ domain


def test_generator_is_deterministic():
    a = domain.generate_examples(36, resolution=64, seed=0)
    b = domain.generate_examples(36, resolution=64, seed=0)
    c = domain.generate_examples(36, resolution=64, seed=1)
    assert [r["image"]["bytes"] for r in a] == [r["image"]["bytes"] for r in b]
    assert [r["llava"] for r in a] == [r["llava"] for r in b]
    assert [r["metadata"] for r in a] == [r["metadata"] for r in b]
    assert [r["image"]["bytes"] for r in a] != [r["image"]["bytes"] for r in c]
    assert [r["llava"] for r in a] != [r["llava"] for r in c]
    assert Counter(json.loads(r["metadata"])["tag"] for r in a) == {t: 6 for t in domain.TAGS}


def test_render_matches_metadata_and_layout_rules():
    rng = np.random.default_rng(0)
    for res in (32, 64, 128):
        lo, hi = round(domain.SIZE_RANGE[0] * res), round(domain.SIZE_RANGE[1] * res)
        for tag in domain.TAGS:
            for _ in range(15):
                spec = domain.sample_spec(tag, rng)
                image, scene = domain.render(spec, rng, res)
                assert image.size == (res, res) and image.mode == "RGB"
                want = Counter((r["class"], r["color"]) for r in spec["include"] for _ in range(r["count"]))
                assert Counter((o.shape, o.color) for o in scene.objects) == want
                boxes = [o.box for o in scene.objects]
                for o in scene.objects:
                    assert lo - 1 <= o.size <= hi
                for i in range(len(boxes)):
                    for j in range(i + 1, len(boxes)):
                        a, b = boxes[i], boxes[j]
                        gap = max(a[0] - b[2], b[0] - a[2], a[1] - b[3], b[1] - a[3])
                        assert gap >= 1, (spec["prompt"], boxes)
                if tag == "position":
                    rel = spec["include"][1]["position"][0]
                    ref, sub = scene.objects
                    dx, dy = sub.center[0] - ref.center[0], sub.center[1] - ref.center[1]
                    along = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[rel]
                    perp = dy if rel in ("left of", "right of") else dx
                    assert along >= 0.2 * res and abs(perp) < along
                    assert rel in domain.relative_position(sub.box, ref.box)
                pixels = np.asarray(image).reshape(-1, 3)
                allowed = {domain.BACKGROUND, *domain.PALETTE.values()}
                assert {tuple(p) for p in np.unique(pixels, axis=0)} <= allowed


def test_metadata_mirrors_geneval_format():
    real = read_metadata(GENEVAL_METADATA)
    real_keys = {k for r in real for k in r}
    real_include_keys = {k for r in real for inc in r["include"] for k in inc}
    real_by_tag = {r["tag"]: r for r in real}
    rng = np.random.default_rng(0)
    for tag in domain.TAGS:
        spec = domain.sample_spec(tag, rng)
        assert set(spec) <= real_keys and spec["prompt"].startswith("a photo of ")
        assert {k for inc in spec["include"] for k in inc} <= real_include_keys
        assert len(spec["include"]) == len(real_by_tag[tag]["include"])
        assert ("exclude" in spec) == ("exclude" in real_by_tag[tag])
    pos = domain.make_spec("position", "triangle", "green", "left of", "circle", "red")
    assert pos["prompt"] == "a photo of a green triangle left of a red circle"
    assert pos["include"] == [{"class": "circle", "count": 1, "color": "red"},
                              {"class": "triangle", "count": 1, "color": "green", "position": ["left of", 0]}]
    count = domain.make_spec("counting", "square", "blue", 3)
    assert count["prompt"] == "a photo of three blue squares"
    assert count["exclude"] == [{"class": "square", "count": 4}]
    assert domain.make_spec("color_attr", "square", "red", "circle", "green")["prompt"] == \
        "a photo of a red square and a green circle"


def test_parquet_loads_with_datasets(tmp_path):
    from datasets import load_dataset

    path = domain.make_dataset(tmp_path / "shapes", num_images=60, resolution=64, seed=0, progress=False)
    assert path == tmp_path / "shapes" / "train.parquet"
    ds = load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 60
    assert set(ds.column_names) == {"image", "llava", "metadata"}
    assert type(ds.features["image"]).__name__ == "Image"
    assert ds.features["llava"].dtype == "string" and ds.features["metadata"].dtype == "string"
    metas = [json.loads(m) for m in ds["metadata"]]
    assert Counter(m["tag"] for m in metas) == {t: 10 for t in domain.TAGS}
    assert [m["prompt"] for m in metas] == ds["llava"]
    assert not any(domain.is_heldout(m["prompt"], m["tag"]) for m in metas)
    first = ds[0]["image"]
    assert first.size == (64, 64) and first.convert("RGB").mode == "RGB"
    # the bytes are embedded: the table alone carries the images
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    assert all(b is not None and b.startswith(b"\x89PNG") for b in table.column("image").combine_chunks().field("bytes").to_pylist())
    # identical bytes for the same seed
    again = domain.make_dataset(tmp_path / "again", num_images=60, resolution=64, seed=0, progress=False)
    assert again.read_bytes() == path.read_bytes()


def test_heldout_metadata_is_disjoint_from_training(tmp_path):
    path = tmp_path / "heldout_metadata.jsonl"
    specs = domain.make_heldout_metadata(path, num_prompts_per_tag=20, seed=0)
    rows = read_metadata(path)
    assert rows == specs and len(rows) == 120
    assert Counter(r["tag"] for r in rows) == {t: 20 for t in domain.TAGS}
    assert all(domain.is_heldout(r["prompt"], r["tag"]) for r in rows)
    train = {json.loads(r["metadata"])["prompt"] for r in domain.generate_examples(3000, seed=0)}
    assert not train & {r["prompt"] for r in rows}
    # distinct while the pool lasts
    for tag in domain.TAGS:
        pool = len(domain.prompt_space(tag, "heldout"))
        prompts = [r["prompt"] for r in rows if r["tag"] == tag]
        assert len(set(prompts)) == min(pool, 20)


def _report_set_as_before(num_prompts_per_tag: int, seed: int) -> list[dict]:
    """The report set as drawn before the validation set existed (the algorithm of heldout_specs then):
    one generator seeded [seed, 0x5EED], per tag in GenEval's order permutations of the held-out pool,
    concatenated until long enough."""
    rng = np.random.default_rng([seed, 0x5EED])
    out = []
    for tag in domain.TAGS:
        pool = domain.prompt_space(tag, "heldout")
        picks: list[int] = []
        while len(picks) < num_prompts_per_tag:
            picks += [int(i) for i in rng.permutation(len(pool))]
        out += [domain.make_spec(tag, *pool[i]) for i in picks[:num_prompts_per_tag]]
    return out


def test_validation_prompts_are_apart_from_training_and_report(tmp_path):
    out = tmp_path / "data"
    assert domain.main(["--output_dir", str(out), "--num_images", "60", "--seed", "3", "--heldout_prompts_per_tag",
                        "8", "--validation_prompts_per_tag", "12", "--no_progress"]) == 0
    report, validation = read_metadata(out / "heldout_metadata.jsonl"), read_metadata(out / "validation_metadata.jsonl")
    assert report == _report_set_as_before(8, 3)
    val_prompts = {v["prompt"] for v in validation}
    assert not val_prompts & {r["prompt"] for r in report}
    # never a training caption: neither of this dataset nor of any training-split prompt string
    import pyarrow.parquet as pq

    captions = set(pq.read_table(out / "train.parquet").column("llava").to_pylist())
    train_strings = {domain.make_spec(tag, *a)["prompt"] for tag in domain.TAGS for a in domain.prompt_space(tag, "train")}
    assert captions <= train_strings and not val_prompts & train_strings
    assert all(domain.is_heldout(v["prompt"], v["tag"]) for v in validation)
    # each tag: distinct prompts, as many as asked while the unused held-out prompts last
    report_prompts = {r["prompt"] for r in report}
    for tag in domain.TAGS:
        spare = {domain.make_spec(tag, *a)["prompt"] for a in domain.prompt_space(tag, "heldout")} - report_prompts
        mine = [v["prompt"] for v in validation if v["tag"] == tag]
        assert len(mine) == len(set(mine)) == min(12, len(spare)), tag
    assert domain.validation_coverage(validation)["single_object"] == 0  # its 4 held-out prompts are all reported
    assert domain.validation_coverage(validation)["position"] == 12
    # deterministic from the seed
    assert domain.validation_specs(12, 3, 8) == validation and domain.validation_specs(12, 4, 8) != validation


@pytest.mark.parametrize("seed,per_tag", [(0, 8), (0, 34), (5, 20)])
def test_report_set_is_unchanged_by_the_validation_set(tmp_path, seed, per_tag):
    assert domain.heldout_specs(per_tag, seed) == _report_set_as_before(per_tag, seed)
    common = ["--num_images", "6", "--seed", str(seed), "--heldout_prompts_per_tag", str(per_tag), "--no_progress"]
    assert domain.main(["--output_dir", str(tmp_path / "a"), *common]) == 0
    assert domain.main(["--output_dir", str(tmp_path / "b"), *common, "--validation_prompts_per_tag", "5"]) == 0
    assert not (tmp_path / "a" / "validation_metadata.jsonl").exists()
    assert ((tmp_path / "a" / "heldout_metadata.jsonl").read_bytes()
            == (tmp_path / "b" / "heldout_metadata.jsonl").read_bytes())


# ------------------------------------------------------------------------------------ scorer


def test_connected_components_small_grid():
    labels = np.array([
        [0, 0, -1, 1, 1],
        [-1, -1, 0, -1, 1],
        [2, -1, -1, -1, -1],
        [-1, 2, -1, 0, 0],
    ])
    roots = scorer.connected_components(labels)
    assert (roots[labels < 0] == -1).all()
    assert roots[0, 0] == roots[0, 1] == roots[1, 2]  # diagonal link (8-connectivity)
    assert roots[0, 3] == roots[0, 4] == roots[1, 4]
    assert roots[2, 0] == roots[3, 1]
    assert roots[3, 3] == roots[3, 4] != roots[0, 0]
    assert len({int(r) for r in roots[labels >= 0]}) == 4
    assert roots[0, 2] == -1 and roots[0, 1] != roots[0, 3]  # different colours never merge


@pytest.mark.parametrize("perturbation", ["clean", "noise", "blur_noise"])
def test_scorer_on_ground_truth(tmp_path, heldout, rendered, perturbation):
    transform = {
        "clean": None,
        "noise": lambda a, rng: _noise(a, rng, 10.0),
        "blur_noise": lambda a, rng: _noise(_blur(a), rng, 10.0),
    }[perturbation]
    root = _write_folder(tmp_path / "images", heldout, rendered, transform)
    assert check_folder(root, heldout, N_SAMPLES) == []
    rows = scorer.score_folder(root, tmp_path / "results.jsonl")
    assert len(rows) == len(heldout) * N_SAMPLES
    overall, per_tag = _accuracy(rows)
    assert overall >= 0.99, (per_tag, [r["reason"] for r in rows if not r["correct"]][:5])
    assert min(per_tag.values()) >= 0.95, per_tag


def test_scorer_shuffled_captions_near_chance(tmp_path, heldout, rendered):
    """Same images, metadata deranged across prompts: the score collapses, and the scorer agrees
    with the renderer's own scene on which (image, caption) pairs happen to be right."""
    rng = np.random.default_rng(7)
    n = len(heldout)
    perm = rng.permutation(n)
    while (perm == np.arange(n)).any():
        perm = rng.permutation(n)
    shuffled = [heldout[j] for j in perm]
    root = _write_folder(tmp_path / "images", shuffled, rendered)
    rows = scorer.score_folder(root)
    by_file = {Path(r["filename"]).parent.parent.name + "/" + Path(r["filename"]).name: r for r in rows}
    agree, oracle_correct = 0, 0
    for index, spec in enumerate(shuffled):
        for k, (_, scene) in enumerate(rendered[index]):
            truth = _oracle(scene, spec)
            oracle_correct += truth
            agree += by_file[f"{index:05d}/{k:04d}.png"]["correct"] == truth
    total = n * N_SAMPLES
    assert agree / total >= 0.99
    overall, per_tag = _accuracy(rows)
    task_mean = float(np.mean(list(per_tag.values())))
    # chance bound: what the ground-truth scenes themselves allow, plus slack
    assert overall <= oracle_correct / total + 0.02
    assert overall < 0.2 and task_mean < 0.4, per_tag


def test_result_rows_and_summary(tmp_path, heldout, rendered, capsys):
    root = _write_folder(tmp_path / "images", heldout, rendered)
    results, summary_json = tmp_path / "results.jsonl", tmp_path / "summary.json"
    assert scorer.main([str(root), "--outfile", str(results), "--json", str(summary_json)]) == 0
    printed = capsys.readouterr().out
    assert "| Single obj. | Two obj. | Counting | Colors | Position | Color attr. | Overall |" in printed
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == len(heldout) * N_SAMPLES
    for row in rows:
        assert set(row) == GENEVAL_RESULT_KEYS
        assert isinstance(row["correct"], bool) and isinstance(row["reason"], str)
        assert json.loads(row["metadata"])["prompt"] == row["prompt"]
        assert isinstance(json.loads(row["details"]), dict)
    # flip some answers so the task accuracies differ, then check the overall by hand
    for i, row in enumerate(rows):
        if i % 7 == 0:
            row["correct"] = not row["correct"]
    flipped = tmp_path / "flipped.jsonl"
    flipped.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize(flipped)
    by_hand = {}
    for tag in TASK_TAGS:
        vals = [r["correct"] for r in rows if r["tag"] == tag]
        by_hand[tag] = sum(vals) / len(vals)
    assert {t: summary["tasks"][t]["accuracy"] for t in TASK_TAGS} == pytest.approx(by_hand)
    assert summary["overall"] == pytest.approx(sum(by_hand.values()) / 6)
    assert summary["total_images"] == len(rows)
    assert json.loads(summary_json.read_text())["total_images"] == len(rows)


def test_scorer_other_resolutions(tmp_path):
    rng = np.random.default_rng(3)
    specs = domain.heldout_specs(num_prompts_per_tag=5, seed=1)
    for res in (32, 128):
        root = domain.write_reference_folder(specs, tmp_path / f"ref{res}", n_samples=2, resolution=res, seed=res)
        assert check_folder(root, specs, 2) == []
        assert _accuracy(scorer.score_folder(root))[0] == 1.0
    # native 128 vs resized to 64 with NEAREST
    assert _accuracy(scorer.score_folder(tmp_path / "ref128", resolution=64))[0] == 1.0
    spec = specs[0]
    image, _ = domain.render(spec, rng, 96)
    dets, size = scorer.detect(image)
    assert size == (96, 96) and scorer.evaluate(dets, spec)[0]


def test_scorer_rejects_wrong_images():
    rng = np.random.default_rng(0)
    spec = domain.make_spec("counting", "square", "blue", 3)
    image, _ = domain.render(domain.make_spec("counting", "square", "blue", 4), rng)
    ok, reason = scorer.evaluate(scorer.detect(image)[0], spec)
    assert not ok and "square<4" in reason
    image, _ = domain.render(domain.make_spec("counting", "square", "red", 3), rng)
    ok, reason = scorer.evaluate(scorer.detect(image)[0], spec)
    assert not ok and "expected blue square>=3" in reason
    left = domain.make_spec("position", "triangle", "green", "left of", "circle", "red")
    right = domain.make_spec("position", "triangle", "green", "right of", "circle", "red")
    image, _ = domain.render(right, rng)
    ok, reason = scorer.evaluate(scorer.detect(image)[0], left)
    assert not ok and "expected triangle left of target" in reason
    blank = Image.new("RGB", (64, 64), domain.BACKGROUND)
    assert scorer.detect(blank)[0] == []
    ok, reason = scorer.evaluate([], domain.make_spec("single_object", "circle", "red"))
    assert not ok and "found 0" in reason


def test_scorer_cli_warns_on_incomplete_folder(tmp_path, capsys):
    import shutil

    meta = tmp_path / "heldout.jsonl"
    specs = domain.make_heldout_metadata(meta, num_prompts_per_tag=2, seed=0)
    assert specs[4]["tag"] == "counting" and specs[4]["prompt"] != specs[5]["prompt"]
    root = domain.write_reference_folder(specs, tmp_path / "images", n_samples=2)
    shutil.rmtree(root / "00004")
    out = tmp_path / "results.jsonl"
    with pytest.warns(UserWarning, match="missing: 'a photo of (two|three|four) "):
        assert scorer.main([str(root), "--outfile", str(out), "--metadata", str(meta), "--n_samples", "2"]) == 0
    captured = capsys.readouterr()
    assert f"00004: prompt folder missing ({specs[4]['prompt']!r})" in captured.err
    assert len(out.read_text().splitlines()) == 22
