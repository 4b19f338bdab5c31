"""The tiny offline FLUX pipeline and dataset builders (data/tiny_flux.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.tiny_flux import (
    PARQUET_FILENAME,
    TinyFluxConfig,
    build_tiny_dataset,
    build_tiny_flux_pipeline,
    ensure_tiny_assets,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")


# `tiny_assets` (session-scoped: ensure_tiny_assets(...) -> (pipeline_dir, dataset_dir), seed 0,
# 32 images of 64 px) comes from tests/conftest.py.


@pytest.fixture(scope="session")
def tiny_pipe(tiny_assets):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_assets[0])


def _offline_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


# ------------------------------------------------------------------------------------ pipeline


def test_pipeline_folder_loads_offline(tiny_assets, tiny_pipe):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    pipe_dir = tiny_assets[0]
    index = json.loads((pipe_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for name in COMPONENTS:
        assert index[name][0] is not None, name
        assert (pipe_dir / name).is_dir(), name
    assert isinstance(tiny_pipe.transformer, FluxTransformer2DModel)
    assert isinstance(tiny_pipe.vae, AutoencoderKL)
    assert isinstance(tiny_pipe.text_encoder, CLIPTextModel)
    assert isinstance(tiny_pipe.text_encoder_2, T5EncoderModel)
    assert isinstance(tiny_pipe.scheduler, FlowMatchEulerDiscreteScheduler)

    tc = tiny_pipe.transformer.config
    assert (tc.num_layers, tc.num_single_layers, tc.num_attention_heads, tc.attention_head_dim) == (2, 2, 2, 16)
    assert (tc.joint_attention_dim, tc.pooled_projection_dim) == (32, 32)
    assert tuple(tc.axes_dims_rope) == (4, 6, 6) and tc.guidance_embeds is True

    sc = tiny_pipe.scheduler.config
    assert sc.use_dynamic_shifting is True
    assert (sc.base_shift, sc.max_shift, sc.base_image_seq_len, sc.max_image_seq_len, sc.shift) == (
        0.5, 1.15, 256, 4096, 3.0,
    )
    vc = tiny_pipe.vae.config
    assert (vc.scaling_factor, vc.shift_factor) == (0.3611, 0.1159)
    assert not vc.use_quant_conv and not vc.use_post_quant_conv


def test_vae_scale_factor_and_channels(tiny_pipe):
    assert tiny_pipe.vae_scale_factor == 8
    assert list(tiny_pipe.vae.config.block_out_channels) == [8, 8, 16, 16]
    assert tiny_pipe.vae.config.latent_channels == 16
    assert tiny_pipe.vae.config.latent_channels * 4 == tiny_pipe.transformer.config.in_channels


def test_tokenizers_reload_with_real_vocabularies(tiny_pipe):
    clip, t5 = tiny_pipe.tokenizer, tiny_pipe.tokenizer_2
    # a tokenizer built from missing files silently has 2 tokens
    assert len(clip) > 50 and len(t5) > 50
    assert clip.model_max_length == 77 and t5.model_max_length == 512

    ids = clip("a photo of a red circle left of a dog").input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    # common prompt words are single tokens: bos + 10 words + eos
    assert len(ids) == 12

    ids = t5("a photo of four purple triangles below a giraffe").input_ids
    assert ids[-1] == t5.eos_token_id and t5.convert_ids_to_tokens(ids[-1]) == "</s>"
    assert t5.unk_token_id not in ids and len(ids) == 10  # 9 words + </s>

    # text-model configs agree with the tokenizers
    cc, tc = tiny_pipe.text_encoder.config, tiny_pipe.text_encoder_2.config
    assert (cc.bos_token_id, cc.eos_token_id, cc.pad_token_id) == (
        clip.bos_token_id, clip.eos_token_id, clip.pad_token_id,
    )
    assert cc.vocab_size == len(clip) and cc.max_position_embeddings == 77
    assert (tc.pad_token_id, tc.eos_token_id) == (t5.pad_token_id, t5.eos_token_id)
    assert tc.vocab_size == len(t5)


def test_two_step_generation_64px(tiny_pipe):
    from PIL import Image

    out = tiny_pipe(
        ["a red circle on a white background", "two blue squares"],
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(out.images) == 2
    for img in out.images:
        assert isinstance(img, Image.Image) and img.size == (64, 64) and img.mode == "RGB"


def _safetensors(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def test_builds_are_bitwise_reproducible(tiny_assets, tmp_path):
    ref = tiny_assets[0]  # built with seed 0
    same = build_tiny_flux_pipeline(tmp_path / "same", seed=0)
    other = build_tiny_flux_pipeline(tmp_path / "other", seed=1)
    ref_files, same_files, other_files = _safetensors(ref), _safetensors(same), _safetensors(other)
    key = "transformer/diffusion_pytorch_model.safetensors"
    assert key in ref_files and len(ref_files) == 4
    assert same_files == ref_files
    for name in ref_files:
        assert other_files[name] != ref_files[name], name
    # tokenizers do not depend on the seed and are reproducible too
    for name in ("tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json"):
        assert (ref / name).read_bytes() == (same / name).read_bytes() == (other / name).read_bytes()


def test_smaller_vae_variant_scale_factor_4(tmp_path):
    from diffusers import FluxPipeline

    cfg = TinyFluxConfig(vae_block_out_channels=[8, 16, 16])
    assert cfg.vae_scale_factor == 4
    pipe = FluxPipeline.from_pretrained(build_tiny_flux_pipeline(tmp_path / "p", config=cfg))
    assert pipe.vae_scale_factor == 4
    out = pipe("a cat", height=32, width=32, num_inference_steps=1, max_sequence_length=16, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)


def test_config_validation():
    with pytest.raises(ValueError, match="axes_dims_rope"):
        TinyFluxConfig(axes_dims_rope=(4, 4, 4)).validate()
    with pytest.raises(ValueError, match="pooled_projection_dim"):
        TinyFluxConfig(pooled_projection_dim=64).validate()
    with pytest.raises(ValueError, match="norm_num_groups"):
        TinyFluxConfig(vae_block_out_channels=[6, 8]).validate()


# ------------------------------------------------------------------------------------ dataset


def test_parquet_dataset_loads(tiny_assets, tmp_path):
    import datasets

    data_dir = tiny_assets[1]
    ds = datasets.load_dataset(
        "parquet", data_files=str(data_dir / PARQUET_FILENAME), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert ds.num_rows == 32
    assert set(ds.column_names) == {"image", "llava"}
    assert isinstance(ds.features["image"], datasets.Image)
    row = ds[0]
    assert row["image"].size == (64, 64) and row["image"].mode == "RGB"
    assert all(isinstance(c, str) and c.strip() for c in ds["llava"])
    # bytes are embedded, not just paths
    raw = ds.cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert raw["bytes"] and raw["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
    assert (data_dir / PARQUET_FILENAME).stat().st_size > 32 * 100


def test_dataset_captions_match_images(tmp_path):
    """The caption names the drawn colour: that colour dominates the non-background pixels."""
    import datasets

    from data.tiny_flux import _BACKGROUND_RGB, _PALETTE

    out = build_tiny_dataset(tmp_path / "d", num_images=12, resolution=32, seed=3)
    ds = datasets.load_dataset("parquet", data_files=str(out / PARQUET_FILENAME), split="train",
                               cache_dir=str(tmp_path / "cache"))
    for row in ds:
        words = row["llava"].split()
        arr = np.asarray(row["image"]).reshape(-1, 3).astype(int)
        if words[1] == "gradient":
            assert tuple(arr[0]) == _PALETTE[words[3]]
            continue
        color, bg = words[1], words[-2]
        assert tuple(arr[0]) == _BACKGROUND_RGB[bg] or (arr == _PALETTE[color]).all(-1).any()
        assert (arr == _PALETTE[color]).all(-1).sum() > 4


def test_dataset_is_deterministic(tmp_path):
    a = build_tiny_dataset(tmp_path / "a", num_images=6, resolution=32, seed=5)
    b = build_tiny_dataset(tmp_path / "b", num_images=6, resolution=32, seed=5)
    c = build_tiny_dataset(tmp_path / "c", num_images=6, resolution=32, seed=6)
    assert (a / PARQUET_FILENAME).read_bytes() == (b / PARQUET_FILENAME).read_bytes()
    assert (a / PARQUET_FILENAME).read_bytes() != (c / PARQUET_FILENAME).read_bytes()


def test_imagefolder_dataset_loads(tmp_path):
    import datasets

    out = build_tiny_dataset(tmp_path / "imgs", num_images=8, resolution=32, format="imagefolder")
    assert len(list(out.glob("*.png"))) == 8
    lines = (out / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 8 and set(json.loads(lines[0])) == {"file_name", "llava"}
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 8
    assert set(ds.column_names) == {"image", "llava"}
    assert ds[0]["image"].size == (32, 32)


def test_bad_dataset_arguments(tmp_path):
    with pytest.raises(ValueError, match="format"):
        build_tiny_dataset(tmp_path / "x", format="zip")
    with pytest.raises(ValueError, match="num_images"):
        build_tiny_dataset(tmp_path / "x", num_images=0)


def test_interrupted_build_leaves_no_folder(tmp_path, monkeypatch):
    import datasets

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(datasets.Dataset, "to_parquet", boom)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_dataset(tmp_path / "tiny-data", num_images=2, resolution=16)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary sibling


def test_ensure_tiny_assets_reuses(tiny_assets):
    pipe_dir, data_dir = tiny_assets
    stamp = (pipe_dir / "model_index.json").stat().st_mtime_ns
    again = ensure_tiny_assets(pipe_dir.parent)
    assert again == (pipe_dir, data_dir)
    assert (pipe_dir / "model_index.json").stat().st_mtime_ns == stamp


def test_ensure_tiny_assets_force_rebuilds(tmp_path):
    (tmp_path / "tiny-flux").mkdir()  # a broken folder (no model_index.json) is replaced
    (tmp_path / "tiny-flux" / "junk").write_text("half-written")
    pipe_dir, data_dir = ensure_tiny_assets(tmp_path, num_images=2, resolution=16)
    assert not (pipe_dir / "junk").exists()
    (pipe_dir / "marker").write_text("old build")
    ensure_tiny_assets(tmp_path, num_images=2, resolution=16)
    assert (pipe_dir / "marker").exists()
    ensure_tiny_assets(tmp_path, num_images=3, resolution=16, force=True)
    assert not (pipe_dir / "marker").exists() and (pipe_dir / "model_index.json").is_file()
    assert json.loads((data_dir / "tiny_build_info.json").read_text())["num_images"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-data", "tiny-flux"]
    # overwrite=False keeps what is there (a concurrent builder that finished first wins)
    build_tiny_dataset(data_dir, num_images=5, resolution=16, overwrite=False)
    assert json.loads((data_dir / "tiny_build_info.json").read_text())["num_images"] == 3


# ------------------------------------------------------------------------------------ CLI


def test_cli_help_lists_every_flag():
    res = subprocess.run(
        [sys.executable, "-m", "data.tiny_flux", "--help"],
        cwd=REPO_ROOT, env=_offline_env(), capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    for flag in ("--output_dir", "--seed", "--num_images", "--resolution", "--force"):
        assert flag in res.stdout


def test_cli_builds_then_reuses(tmp_path):
    cmd = [sys.executable, "-m", "data.tiny_flux", "--output_dir", str(tmp_path), "--num_images", "4",
           "--resolution", "32"]
    run = lambda extra=(): subprocess.run(  # noqa: E731
        cmd + list(extra), cwd=REPO_ROOT, env=_offline_env(), capture_output=True, text=True, timeout=120
    )
    first = run()
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "tiny-flux" / "model_index.json").is_file()
    assert (tmp_path / "tiny-data" / PARQUET_FILENAME).is_file()
    assert "built tiny FLUX pipeline" in first.stdout and str(tmp_path / "tiny-flux") in first.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    stamp = (tmp_path / "tiny-flux" / "model_index.json").stat().st_mtime_ns
    second = run()
    assert second.returncode == 0, second.stderr
    assert "reusing tiny FLUX pipeline" in second.stdout and "reusing tiny dataset" in second.stdout
    assert (tmp_path / "tiny-flux" / "model_index.json").stat().st_mtime_ns == stamp
