"""Own data: a jsonl or csv caption file beside an images folder, given by --data_dir, --data_files or
--dataset_name FILE, with relative image paths read against the metadata file's folder; every layout gives
the same samples as decoding the PNGs by hand; ambiguous layouts are refused with the flag that settles them."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import Text2ImageDataset, image_root, load_hf_dataset, preprocess_image

CAPTIONS = ["a red circle", "two blue squares", "a green triangle", "a yellow square"]


def _images(folder: Path) -> list[str]:
    """Four distinct 40x24 PNGs under folder/imgs; returns their paths relative to folder."""
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(len(CAPTIONS)):
        arr = np.random.default_rng(i).integers(0, 256, (24, 40, 3), dtype=np.uint8)
        name = f"imgs/{i:02d}.png"
        Image.fromarray(arr).save(folder / name)
        names.append(name)
    return names


def _jsonl(path: Path, names: list[str], image_key: str = "image", text_key: str = "text") -> Path:
    path.write_text("".join(json.dumps({image_key: n, text_key: c}) + "\n" for n, c in zip(names, CAPTIONS)))
    return path


def _csv(path: Path, names: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "text"])
        writer.writerows(zip(names, CAPTIONS))
    return path


@pytest.fixture
def layouts(tmp_path) -> dict[str, dict]:
    """The README's three layouts (+ datasets' own imagefolder), as load_hf_dataset keyword arguments."""
    a = tmp_path / "A"
    a.mkdir()
    _jsonl(a / "data.jsonl", _images(a))
    b = tmp_path / "B"
    b.mkdir()
    _csv(b / "captions.csv", _images(b))
    c = tmp_path / "C" / "sub"
    c.mkdir(parents=True)
    _jsonl(c / "data.jsonl", _images(c))
    d = tmp_path / "D"
    d.mkdir()
    _jsonl(d / "metadata.jsonl", _images(d), image_key="file_name")
    return {"data_dir": dict(data_dir=str(a)), "data_files_csv": dict(data_files=[str(b / "captions.csv")]),
            "dataset_name_file": dict(dataset_name=str(c / "data.jsonl")), "imagefolder": dict(dataset_name=str(d))}


def _dataset(source: dict, tmp_path: Path) -> Text2ImageDataset:
    hf = load_hf_dataset(**source, cache_dir=str(tmp_path / "hf-cache"))
    root = image_root(source.get("dataset_name"), source.get("data_files"), source.get("data_dir"))
    return Text2ImageDataset(hf, 16, image_column="image", caption_column="text", data_dir=root)


def test_every_layout_gives_the_hand_decoded_samples(layouts, tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths must not depend on the working directory
    reference = [preprocess_image(Image.open(tmp_path / "A" / f"imgs/{i:02d}.png"), 16) for i in range(4)]
    for name, source in layouts.items():
        dataset = _dataset(source, tmp_path)
        assert len(dataset) == 4, name
        samples = [dataset[i] for i in range(4)]
        assert [s.get("bad_reason") for s in samples] == [None] * 4, (name, samples)
        assert [s["caption"] for s in samples] == CAPTIONS, name
        for got, want in zip(samples, reference):
            assert torch.equal(got["pixel_values"], want), name


def test_relative_paths_are_read_against_the_metadata_folder(layouts, tmp_path):
    assert image_root(**layouts["dataset_name_file"]) == str(tmp_path / "C" / "sub")
    assert image_root(**layouts["data_files_csv"]) == str(tmp_path / "B")
    assert image_root(**layouts["data_dir"]) == str(tmp_path / "A")
    assert image_root(dataset_name="owner/hub-dataset") is None


def test_missing_image_names_the_folder_it_was_read_against(tmp_path):
    folder = tmp_path / "E"
    folder.mkdir()
    _jsonl(folder / "data.jsonl", ["pics/00.png"] * 4)  # a wrong relative path
    _images(folder)
    sample = _dataset(dict(data_files=[str(folder / "data.jsonl")]), tmp_path)[0]
    assert sample["bad_reason"] == (f"image file not found: {folder / 'pics/00.png'} (relative image paths are read "
                                    f"against {folder}; --data_dir sets that folder)")


def test_ambiguous_layouts_say_what_was_read_and_which_flag_to_use(tmp_path):
    two = tmp_path / "two"
    two.mkdir()
    names = _images(two)
    _jsonl(two / "train.jsonl", names)
    _csv(two / "val.csv", names)
    with pytest.raises(ValueError, match=rf"{two} holds images and several caption files \(train.jsonl, val.csv\), "
                                         rf"so it is ambiguous which one to train on. Pass one with --data_files "
                                         rf"{two / 'train.jsonl'}"):
        load_hf_dataset(data_dir=str(two))

    both = tmp_path / "both"
    both.mkdir()
    names = _images(both)
    _jsonl(both / "metadata.jsonl", names, image_key="file_name")
    _jsonl(both / "data.jsonl", names)
    with pytest.raises(ValueError, match=rf"\(metadata.jsonl, data.jsonl\).*--dataset_name imagefolder --data_dir {both} "):
        load_hf_dataset(str(both))

    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    _jsonl(tmp_path / "x" / "a.jsonl", names)
    _jsonl(tmp_path / "y" / "b.jsonl", names)
    with pytest.raises(ValueError, match="lie in 2 folders .* pass --data_dir ROOT"):
        image_root(data_files=[str(tmp_path / "x" / "a.jsonl"), str(tmp_path / "y" / "b.jsonl")])


def test_empty_imagefolder_metadata_is_explained(tmp_path):
    folder = tmp_path / "F"
    folder.mkdir()
    _images(folder)
    (folder / "metadata.jsonl").write_text("")
    for source in (dict(dataset_name=str(folder)), dict(data_dir=str(folder)),
                   dict(dataset_name="imagefolder", data_dir=str(folder))):
        with pytest.raises(ValueError, match=rf"^{folder / 'metadata.jsonl'} is empty: an imagefolder's metadata.jsonl "
                                             "needs one row per image"):
            load_hf_dataset(**source, cache_dir=str(tmp_path / "hf-cache"))


@pytest.mark.slow
def test_each_layout_trains_on_the_same_first_batch(layouts, tiny_assets, tmp_path, monkeypatch, capsys):
    """Two sCM steps per layout from another working directory: identical losses and gradient norms (same pixels,
    captions, order and noise), so the layouts feed the trainer the same batches."""
    from fault_injection import read_metrics, scm_argv
    import train_sCM
    from training.cli import run_cli

    pipe, _ = tiny_assets
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no imgs/ here: only the metadata folder can resolve the paths
    losses = {}
    for name, source in layouts.items():
        if name == "imagefolder":
            continue  # datasets' own layout (column file_name → image): covered by the sample test above
        flags = {k: (v[0] if isinstance(v, list) else v) for k, v in source.items()}
        if "data_dir" not in flags:
            flags["data_dir"] = None
        out = tmp_path / f"run_{name}"
        argv = scm_argv(pipe, None, out, **flags, image_column="image", caption_column="text", train_batch_size=2,
                        max_train_steps=2, checkpointing_steps=2, tangent_warmup_steps=1)
        assert run_cli(lambda: train_sCM.main(argv)) == 0, capsys.readouterr().err[-2000:]
        record = read_metrics(out)[2]  # at step 1 the student equals the teacher: no data term in the loss yet
        assert record["l2_loss"] > 0
        losses[name] = (record["l2_loss"], record["grad_norm"])
    assert len(set(losses.values())) == 1, losses
