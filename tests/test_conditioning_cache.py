"""Precomputed conditioning: the encode command (shards, resume, rank split) and --conditioning_cache training
(same losses as on-the-fly encoding, text encoders and VAE never loaded, exact resume)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from data.conditioning_cache import ConditioningCacheDataset, shard_name
from data.encode_conditioning import main as encode_main
from fault_injection import assert_same_weights, load_export, read_metrics, scm_argv
from training.core import train

RES = 32


def _encode(pipe: Path, data: Path, out: Path, monkeypatch=None, rank=None, world=None, **flags) -> int:
    if monkeypatch is not None:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
    argv = ["--pretrained_model_name_or_path", str(pipe), "--data_dir", str(data), "--resolution", str(RES),
            "--output_dir", str(out), "--dtype", "float32", "--shard_size", "5", "--batch_size", "4"]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return encode_main(argv)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*.safetensors"))}


@pytest.fixture(scope="module")
def cache(tiny_assets, tmp_path_factory) -> Path:
    pipe, data = tiny_assets
    out = tmp_path_factory.mktemp("cache") / "cond"
    assert _encode(pipe, data, out) == 0
    return out


def test_cache_holds_what_the_encoders_give(tiny_assets, cache):
    """Shard contents against a direct FluxConditioner encoding of the same samples (independent path)."""
    from model.flux_io import FluxConditioner, load_flux_components
    from training.args import build_parser
    from training.train_data import load_train_dataset

    pipe, data = tiny_assets
    view = ConditioningCacheDataset(cache)
    n = len(view)
    assert view.spec.num_shards == -(-n // 5) and (cache / shard_name(view.spec.num_shards - 1)).is_file()
    args = build_parser("x").parse_args(["--pretrained_model_name_or_path", str(pipe), "--data_dir", str(data),
                                         "--resolution", str(RES), "--output_dir", "unused"])
    dataset = load_train_dataset(args)
    conditioner = FluxConditioner(load_flux_components(str(pipe)), "cpu", 256)
    for i in (0, 6, n - 1):  # first shard, second shard, the ragged last one
        sample = dataset[i]
        latents = conditioner.encode_images(sample["pixel_values"][None])[0]
        embeds, pooled, _ = conditioner.encode_prompts([sample["caption"]])
        cached = view[i]
        torch.testing.assert_close(cached["latents"], latents, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached["prompt_embeds"], embeds[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached["pooled"], pooled[0], rtol=1e-5, atol=1e-5)


def test_encode_resumes_and_splits_shards_by_rank(tiny_assets, cache, tmp_path, monkeypatch):
    pipe, data = tiny_assets
    reference = _digest(cache)
    # Two ranks, run one after the other: each writes only its own shards (k mod 2 == rank).
    split = tmp_path / "split"
    _encode(pipe, data, split, monkeypatch, rank=1, world=2)
    odd = sorted(_digest(split))
    assert odd == [shard_name(k) for k in range(1, len(reference), 2)]
    _encode(pipe, data, split, monkeypatch, rank=0, world=2)
    assert _digest(split) == reference  # identical bytes to the one-process cache
    # Resume: a missing shard and a leftover temporary file; finished shards are not rewritten.
    victim = split / shard_name(1)
    victim.unlink()
    (split / f".{shard_name(1)}.tmp-999").write_bytes(b"partial")
    kept = split / shard_name(0)
    before = kept.stat().st_mtime_ns
    _encode(pipe, data, split, monkeypatch, rank=0, world=1)
    assert _digest(split) == reference and kept.stat().st_mtime_ns == before
    # Other settings into the same folder: refused, nothing touched.
    with pytest.raises(ValueError, match="other settings .*max_sequence_length"):
        _encode(pipe, data, split, max_sequence_length=16)


def _scm_args(pipe, data, out, **flags):
    from train_sCM import parse_args

    return parse_args(scm_argv(pipe, data, out, **{"max_train_steps": 2, "checkpointing_steps": 1, **flags}))


def _meanflow_args(pipe, data, out, **flags):
    from train_meanflow import parse_args

    argv = scm_argv(pipe, data, out, **{"max_train_steps": 2, "checkpointing_steps": 1, **flags})
    return parse_args(argv + ["--use_cfg_meanflow", "True", "--cfg_prob", "0.5"])


@pytest.mark.parametrize("method", ["sCM", "MeanFlow"])
def test_cached_training_equals_on_the_fly_and_loads_no_encoder(tiny_assets, cache, tmp_path, monkeypatch, method):
    """Same seed → the same losses and weights; the cached run may not touch the encoders' loader."""
    from training.meanflow import MeanFlowMethod
    from training.scm import SCMMethod

    pipe, data = tiny_assets
    make_args, make_method = ((_scm_args, SCMMethod.from_args) if method == "sCM"
                              else (_meanflow_args, MeanFlowMethod.from_args))
    live = make_args(pipe, data, tmp_path / "live")
    train(live, make_method(live))

    import model.flux_io
    import training.launch

    def refuse(*a, **k):
        raise AssertionError("the text encoders / VAE were loaded although --conditioning_cache was given")

    monkeypatch.setattr(training.launch, "load_flux_components", refuse)
    monkeypatch.setattr(model.flux_io, "load_flux_components", refuse)
    monkeypatch.setattr(model.flux_io.FluxConditioner, "__init__", refuse)
    cached = make_args(pipe, data, tmp_path / "cached", conditioning_cache=cache)
    train(cached, make_method(cached))

    a, b = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "cached")
    assert sorted(a) == sorted(b) == [1, 2]
    loss_key = "loss_sCM" if method == "sCM" else "loss"
    for step in a:
        assert b[step][loss_key] == pytest.approx(a[step][loss_key], rel=1e-5, abs=1e-7)
    live_w, cached_w = load_export(tmp_path / "live", 2), load_export(tmp_path / "cached", 2)
    for key in live_w:
        torch.testing.assert_close(cached_w[key], live_w[key], rtol=1e-4, atol=1e-6)


def test_cache_mismatch_and_incomplete_cache_are_clear_errors(tiny_assets, cache, tmp_path):
    from training.scm import SCMMethod

    pipe, data = tiny_assets
    args = _scm_args(pipe, data, tmp_path / "a", conditioning_cache=cache, resolution=64)
    with pytest.raises(ValueError, match="encoded with resolution=32 but this run has --resolution 64"):
        train(args, SCMMethod.from_args(args))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in cache.iterdir():
        if f.name != shard_name(1):
            (broken / f.name).write_bytes(f.read_bytes())
    args = _scm_args(pipe, data, tmp_path / "b", conditioning_cache=broken)
    with pytest.raises(FileNotFoundError, match="incomplete: 1 of .* shards missing"):
        train(args, SCMMethod.from_args(args))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


@pytest.mark.slow
def test_cached_run_resumes_exactly(tiny_assets, cache, tmp_path):
    """1 step, stop, resume to 2 steps == 2 straight steps (the data position lives in the train state)."""
    import shutil

    from training.scm import SCMMethod

    pipe, data = tiny_assets
    straight = _scm_args(pipe, data, tmp_path / "straight", conditioning_cache=cache)
    train(straight, SCMMethod.from_args(straight))
    first = _scm_args(pipe, data, tmp_path / "part", conditioning_cache=cache, max_train_steps=1)
    train(first, SCMMethod.from_args(first))
    again = _scm_args(pipe, data, tmp_path / "part", conditioning_cache=cache, resume_from_checkpoint="latest")
    train(again, SCMMethod.from_args(again))
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "part")
    assert [a[s]["loss_sCM"] for s in (1, 2)] == [b[s]["loss_sCM"] for s in (1, 2)]
    assert_same_weights(load_export(tmp_path / "straight", 2), load_export(tmp_path / "part", 2))
    shutil.rmtree(tmp_path)


# ------------------------------------------------------------------------- which encoders made the cache

def _check(cache_dir, pipe, data, dtype=torch.float32, **flags):
    from data.conditioning_cache import CacheSpec, check_cache_matches_args

    check_cache_matches_args(CacheSpec.read(cache_dir), _scm_args(pipe, data, Path("unused"), **flags), dtype)


def _perturb_weights(file: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(file)
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in state.items()}, str(file), {"format": "pt"})


def test_cache_identity_is_the_encoders_not_the_spelling_of_the_path(tiny_assets, cache, tmp_path, monkeypatch):
    """./relative/ with a trailing slash, a symlink and a copy of the pipeline are the same encoders; the same
    folder name with other text-encoder or VAE weights is not; resuming an encode by another spelling works."""
    import shutil

    pipe, data = tiny_assets
    monkeypatch.chdir(pipe.parent)
    (tmp_path / "link").symlink_to(pipe, target_is_directory=True)
    copy = tmp_path / "copy"
    shutil.copytree(pipe, copy)
    for spelling in (f"./{pipe.name}/", tmp_path / "link", copy):
        _check(cache, spelling, data)  # accepted

    same_name = tmp_path / "same_name"
    shutil.copytree(pipe, same_name)
    encoded = tmp_path / "encoded_from_same_name"
    shutil.copytree(cache, encoded)
    meta = json.loads((encoded / "cache.json").read_text())
    from data.conditioning_cache import pipeline_identity

    meta.update(pretrained_model_name_or_path=str(same_name), identity=pipeline_identity(str(same_name), None))
    (encoded / "cache.json").write_text(json.dumps(meta))
    _check(encoded, same_name, data)
    for part, weights in (("text_encoder_2", "model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")):
        _perturb_weights(same_name / part / weights)
        with pytest.raises(ValueError, match=f"encoded by .*same_name.* \\(other .*{part}.* files\\) but this run's "
                                             "--pretrained_model_name_or_path .*re-encode the cache"):
            _check(encoded, same_name, data)
    _perturb_weights(copy / "transformer" / "diffusion_pytorch_model.safetensors")
    _check(cache, copy, data)  # the transformer does not make the cache

    resumed = tmp_path / "resumed"
    shutil.copytree(cache, resumed)
    before = _digest(resumed)
    assert _encode(Path(f"./{pipe.name}/"), data, resumed) == 0  # same encoders: nothing to redo, nothing refused
    assert _digest(resumed) == before


def test_cache_encoded_in_another_dtype_is_refused_by_the_trainer(tiny_assets, cache, tmp_path):
    from accelerate.state import AcceleratorState

    from training.scm import SCMMethod

    pipe, data = tiny_assets
    args = _scm_args(pipe, data, tmp_path / "bf16", conditioning_cache=cache, mixed_precision="bf16")
    AcceleratorState._reset_state(reset_partial_state=True)  # the process-wide state fixes the precision
    try:
        with pytest.raises(ValueError, match="text encoders in float32 but this run's precision encodes in bfloat16 .*"
                                             "re-encode with --dtype bfloat16"):
            train(args, SCMMethod.from_args(args))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert not (tmp_path / "bf16" / "checkpoints").exists()
    _check(cache, pipe, data, dtype=torch.float32)  # the matching precision is accepted


def test_large_file_fingerprint_samples_whole_file_changes(tmp_path):
    from data.conditioning_cache import component_fingerprint

    rng = np.random.default_rng(0)
    weights = rng.standard_normal(3 * 2 ** 20 // 4).astype(np.float32)  # 3 MiB: sampled, not hashed whole
    for name, values in (("a", weights), ("b", weights), ("c", weights + np.float32(1e-3))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(values.tobytes())
    assert component_fingerprint(tmp_path / "a") == component_fingerprint(tmp_path / "b")
    assert component_fingerprint(tmp_path / "a") != component_fingerprint(tmp_path / "c")


def test_hub_pipeline_identity_uses_the_local_snapshot_and_its_commit(tiny_assets, tmp_path, monkeypatch):
    """A hub id whose snapshot is in the local hub cache: its fingerprints and commit, equal to the snapshot
    folder's own fingerprints; a hub id known nowhere locally falls back to its name."""
    import shutil

    import huggingface_hub.constants

    from data.conditioning_cache import pipeline_identity

    pipe, _ = tiny_assets
    repo = tmp_path / "hub" / "models--org--tiny-flux"
    shutil.copytree(pipe, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = pipeline_identity("org/tiny-flux", None)
    assert hub["commit"] == "0123abcd" and hub["components"] == pipeline_identity(str(pipe), None)["components"]
    assert set(hub["components"]) == {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"}
    assert pipeline_identity("org/not-downloaded", None) == {"source": "org/not-downloaded", "commit": None,
                                                            "components": None}
