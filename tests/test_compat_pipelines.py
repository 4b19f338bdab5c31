"""Our pipelines under the features diffusers offers on FluxPipeline (issue #22).

References: the same pipeline without the feature (bf16 vs fp8 storage, cached vs uncached), diffusers'
own ``set_adapters`` for the LoRA scale, and the images of the pipeline before save_pretrained.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                             TaylorSeerCacheConfig)

from model.loading import load_flux_transformer
from model.pipeline import MeanFlowFluxPipeline, SCMFluxPipeline, load_teacher_pipeline
from training.checkpointing import export_transformer

KW = dict(height=64, width=64, output_type="np", max_sequence_length=32)
STEPS = {"scm": 2, "meanflow": 4}
CLASSES = {"scm": SCMFluxPipeline, "meanflow": MeanFlowFluxPipeline}


def _gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def students(tiny_assets, tmp_path_factory):
    pipe_dir, _ = tiny_assets
    root = tmp_path_factory.mktemp("compat_ckpts")
    tf = load_flux_transformer(str(pipe_dir), 1.0)
    export_transformer(root / "scm.pt", tf.state_dict(), dict(tf.config), 5)
    tf.enable_interval_embedding("copy")
    export_transformer(root / "mf.pt", tf.state_dict(), dict(tf.config), 7)
    return {"pipe": str(pipe_dir), "scm": root / "scm.pt", "meanflow": root / "mf.pt"}


def _sample(pipe, method, **kw):
    return pipe("a photo of a cat", generator=_gen(), num_inference_steps=STEPS[method], **KW, **kw).images


def test_saved_teacher_pipeline_loads_back_with_identical_images(students, tmp_path):
    teacher = load_teacher_pipeline(students["pipe"])
    teacher.save_pretrained(tmp_path / "teacher")
    index = json.loads((tmp_path / "teacher" / "model_index.json").read_text())
    assert index["transformer"] == ["model.transformer", "DistillFluxTransformer2DModel"]
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "teacher")
    assert type(reloaded.transformer) is type(teacher.transformer)
    kw = dict(KW, num_inference_steps=2)
    np.testing.assert_array_equal(reloaded("a cat", generator=_gen(), **kw).images,
                                  teacher("a cat", generator=_gen(), **kw).images)


@pytest.mark.parametrize("method", ["scm", "meanflow"])
def test_fp8_layerwise_casting_with_bf16_compute(students, method):
    pipe = CLASSES[method].from_checkpoint(students["pipe"], students[method], dtype=torch.bfloat16)
    bf16 = _sample(pipe, method)
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert torch.float8_e4m3fn in {p.dtype for p in pipe.transformer.parameters()}
    fp8 = _sample(pipe, method)
    assert np.isfinite(fp8).all()
    assert not np.array_equal(fp8, bf16)  # the weights really were stored in fp8
    assert np.abs(fp8 - bf16).mean() < 0.02 and np.abs(fp8 - bf16).max() < 0.15


@pytest.mark.parametrize("method", ["scm", "meanflow"])
def test_lora_scale_per_call_equals_set_adapters(students, method):
    from peft import LoraConfig

    pipe = CLASSES[method].from_checkpoint(students["pipe"], students[method])
    torch.manual_seed(0)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                            init_lora_weights=False))
    full = _sample(pipe, method)
    half = _sample(pipe, method, joint_attention_kwargs={"scale": 0.5})
    pipe.transformer.set_adapters(["default"], weights=[0.5])
    assert not np.allclose(full, half, atol=1e-3)
    np.testing.assert_allclose(half, _sample(pipe, method), atol=1e-6)


def _cache_configs(pipe, steps):
    current = lambda: pipe.current_timestep  # noqa: E731
    return {
        "first_block": FirstBlockCacheConfig(threshold=0.05),
        "taylorseer": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
        "faster": FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
                                    attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True,
                                    current_timestep_callback=current),
        "pab": PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, current_timestep_callback=current,
                                               spatial_attention_timestep_skip_range=(100, 800)),
        "mag": MagCacheConfig(num_inference_steps=steps, mag_ratios=[1.0] * steps),
    }


@pytest.mark.parametrize("method", ["scm", "meanflow"])
def test_diffusers_cache_hooks_run_and_stay_close(students, method):
    pipe = CLASSES[method].from_checkpoint(students["pipe"], students[method])
    plain = _sample(pipe, method)
    for name, config in _cache_configs(pipe, STEPS[method]).items():
        pipe.transformer.enable_cache(config)
        try:
            cached = _sample(pipe, method)
            again = _sample(pipe, method)  # the hooks' state is reset between calls
        finally:
            pipe.transformer.disable_cache()
        assert np.isfinite(cached).all(), name
        np.testing.assert_array_equal(cached, again, err_msg=name)
        assert np.abs(cached - plain).max() < 0.25, name
    # A first-block cache that always reuses (huge threshold) changes the later steps: the hook is active.
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    try:
        assert not np.array_equal(_sample(pipe, method), plain)
    finally:
        pipe.transformer.disable_cache()
    np.testing.assert_array_equal(_sample(pipe, method), plain)


@pytest.mark.parametrize("method", ["scm", "meanflow"])
def test_callback_on_step_end_sees_and_replaces_the_state(students, method):
    pipe = CLASSES[method].from_checkpoint(students["pipe"], students[method])
    seen = []

    def record(p, step, t, tensors):
        seen.append((step, float(t), tensors["latents"].clone()))
        return {}

    final = pipe("a photo of a cat", generator=_gen(), num_inference_steps=STEPS[method], output_type="latent",
                 **{k: v for k, v in KW.items() if k != "output_type"}, callback_on_step_end=record).images
    assert [s for s, _, _ in seen] == list(range(STEPS[method]))
    # The last state the callback saw is what the pipeline decodes (sCM: x/σ_d, MeanFlow: z at t = 0).
    torch.testing.assert_close(seen[-1][2], final)
    # Replacing the latents changes what follows; interrupting after step 0 stops the loop.
    zeroed = pipe("a photo of a cat", generator=_gen(), num_inference_steps=STEPS[method], output_type="latent",
                  **{k: v for k, v in KW.items() if k != "output_type"},
                  callback_on_step_end=lambda p, i, t, d: {"latents": torch.zeros_like(d["latents"])}).images
    assert torch.count_nonzero(zeroed) == 0  # the last step's state is the output (sCM's t_N = 0 adds no noise)
    calls = []

    def stop(p, step, t, tensors):
        calls.append(step)
        p._interrupt = True
        return {}

    pipe("a photo of a cat", generator=_gen(), num_inference_steps=STEPS[method], **KW, callback_on_step_end=stop)
    assert calls == [0]
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe("a photo of a cat", num_inference_steps=1, **KW, callback_on_step_end=record,
             callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_group_offloading_gives_identical_images(students):
    pipe = MeanFlowFluxPipeline.from_checkpoint(students["pipe"], students["meanflow"])
    plain = _sample(pipe, "meanflow")
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1)
    np.testing.assert_array_equal(_sample(pipe, "meanflow"), plain)


def test_pipeline_suite_features_on_the_sampler(students, tmp_path):
    """The PipelineTesterMixin checks a user can hit: variants, per-component dtypes, pipeline-level group
    offloading, optional components, prompt embeddings encoded separately, batch == single."""
    pipe = SCMFluxPipeline.from_checkpoint(students["pipe"], students["scm"])
    ref = _sample(pipe, "scm")
    close = dict(rtol=0, atol=1e-5)  # reloaded weights are mmap'd: BLAS rounding differs (test_compat_export.py)
    pipe.save_pretrained(tmp_path / "variant", variant="fp16")
    assert any(".fp16." in p.name for p in (tmp_path / "variant" / "transformer").iterdir())
    np.testing.assert_allclose(_sample(SCMFluxPipeline.from_pretrained(tmp_path / "variant", variant="fp16"), "scm"),
                               ref, **close)
    mixed = SCMFluxPipeline.from_pretrained(tmp_path / "variant", variant="fp16", image_encoder=None,
                                            dtype={"transformer": torch.bfloat16, "default": torch.float32})
    assert (mixed.transformer.dtype, mixed.vae.dtype) == (torch.bfloat16, torch.float32)
    assert np.isfinite(_sample(mixed, "scm")).all()
    embeds, pooled, _ = pipe.encode_prompt("a photo of a cat", None, max_sequence_length=KW["max_sequence_length"])
    by_embeds = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, generator=_gen(), num_inference_steps=2, **KW)
    np.testing.assert_allclose(by_embeds.images, ref, **close)
    batch = pipe(["a photo of a cat", "a photo of a dog"], generator=[_gen(), torch.Generator().manual_seed(1)],
                 num_inference_steps=2, **KW).images
    np.testing.assert_allclose(batch[:1], ref, **close)
    pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                              offload_type="leaf_level")
    np.testing.assert_array_equal(_sample(pipe, "scm"), ref)
