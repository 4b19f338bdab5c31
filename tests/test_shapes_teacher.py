"""The shapes teacher builder's recipe-v2 parts (evaluation/shapes/teacher.py): resumable optimisation,
text encoders trained through the pipeline's own encoding path, classifier-free guidance and guidance
distillation. The slow test runs a whole micro v2 build interrupted and resumed."""
from __future__ import annotations

import copy
import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from evaluation.shapes import teacher as T
from evaluation.shapes.teacher_build.recipes import tiny_flux_config


def _toy_config(**kw) -> T.TeacherConfig:
    return replace(T.TeacherConfig(), max_grad_norm=10.0, ema_decay=0.9, **kw)


def _toy_run(checkpoint: Path | None, total: int, budget: T.Budget | None = None):
    """A linear regression trained by optimise(): the batch, and a dropout mask from the global RNG."""
    torch.manual_seed(5)
    model = torch.nn.Linear(3, 2)
    gen = torch.Generator().manual_seed(1)
    w_true = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]])

    def loss_fn(step: int):
        x = torch.randn(8, 3, generator=gen)
        keep = torch.nn.functional.dropout(torch.ones(8, 1), 0.25)  # global RNG, restored on resume
        return ((model(x) - x @ w_true.T) * keep).square().mean()

    result = T.optimise("toy", {"m": model}, loss_fn, total, lambda s: 0.05, gen, _toy_config(), checkpoint, budget,
                        progress=False)
    return model, result


def test_optimise_resumes_bit_identically(tmp_path):
    straight, full = _toy_run(None, 10)
    ckpt = tmp_path / "toy.pt"
    _, paused = _toy_run(ckpt, 10, T.Budget(max_steps=4))
    assert not paused.done and paused.step == 4 and paused.ema is None and ckpt.is_file()
    resumed, done = _toy_run(ckpt, 10, T.Budget(max_steps=100))
    assert done.done and done.step == 10
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)
    for name, value in full.ema["m"].items():
        assert torch.equal(done.ema["m"][name], value), name
    # the EMA is a real average: not the final weights, and closer to them than the initial ones
    assert not torch.equal(full.ema["m"]["weight"], straight.weight)


def test_finished_stage_keeps_a_compact_checkpoint_with_the_same_result(tmp_path):
    """A finished stage saves only its EMA (no optimizer, no raw weights): reading it back gives the same
    EMA and leaves the global RNG where the uninterrupted stage left it, without a training step."""
    from evaluation.shapes.teacher_build.optim import compact_finished_checkpoint, load_ema

    _, straight = _toy_run(None, 10)
    rng_after_straight = torch.get_rng_state()
    ckpt = tmp_path / "toy.pt"
    _, done = _toy_run(ckpt, 10)
    state = torch.load(ckpt, weights_only=False)
    assert state["finished"] and "optimizer" not in state and "ema" not in state
    for name, value in straight.ema["m"].items():
        assert torch.equal(state["modules"]["m"][name], value), name
    torch.manual_seed(123)  # the re-read must restore the stage's RNG state, not keep this one
    _, again = _toy_run(ckpt, 10)
    assert again.done and again.history == done.history
    assert torch.equal(torch.get_rng_state(), rng_after_straight)
    for name, value in straight.ema["m"].items():
        assert torch.equal(again.ema["m"][name], value), name
    fresh = torch.nn.Linear(3, 2)
    load_ema({"m": fresh}, state)  # snapshots read compact checkpoints too
    assert torch.equal(fresh.weight, straight.ema["m"]["weight"])

    # a full checkpoint written before the compact form: rewritten in place with the same EMA
    _, four = _toy_run(None, 4)
    old = tmp_path / "old.pt"
    _toy_run(old, 10, T.Budget(max_steps=4))
    assert compact_finished_checkpoint(old, {"m": torch.nn.Linear(3, 2)})
    assert not compact_finished_checkpoint(old, {"m": torch.nn.Linear(3, 2)})
    rewritten = torch.load(old, weights_only=False)
    for name, value in four.ema["m"].items():
        assert torch.equal(rewritten["modules"]["m"][name], value), name
    assert rewritten["finished"] and "optimizer" not in rewritten


def test_ema_state_covers_tied_weights():
    """T5 ties ``shared`` and ``encoder.embed_tokens``: both names must carry the EMA."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2))
    params = list(model.parameters())
    ema = [torch.full_like(p, 0.5) for p in params]
    state = T._ema_state_dicts({"t5": model}, params, ema)["t5"]
    assert torch.all(state["shared.weight"] == 0.5) and torch.all(state["encoder.embed_tokens.weight"] == 0.5)
    assert not torch.all(model.shared.weight == 0.5)  # the module keeps its trained weights


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from diffusers import FluxPipeline

    from data.tiny_flux import TinyFluxConfig, build_tiny_flux_pipeline

    cfg = T.TeacherConfig().flux
    folder = build_tiny_flux_pipeline(tmp_path_factory.mktemp("skeleton") / "p", seed=0,
                                      config=TinyFluxConfig(**{**cfg, "axes_dims_rope": tuple(cfg["axes_dims_rope"])}))
    return FluxPipeline.from_pretrained(folder, dtype=torch.float32)


def test_trainable_text_encodes_exactly_as_the_pipeline(tiny_pipe):
    captions = ["a photo of a red square and a green circle", "a photo of three blue triangles"]
    text = T.TrainableText(tiny_pipe, captions, max_sequence_length=16)
    with torch.no_grad():
        enc, pooled = text.encode(torch.tensor([0, 1, text.uncond]))
        ref_enc, ref_pooled, _ = tiny_pipe.encode_prompt(captions + [T.UNCONDITIONAL_PROMPT], prompt_2=None,
                                                         max_sequence_length=16)
    assert torch.equal(enc, ref_enc) and torch.equal(pooled, ref_pooled)
    # dropped captions become the unconditional prompt
    with torch.no_grad():
        enc2, _ = text(torch.tensor([0, 1]), torch.tensor([True, False]))
    assert torch.equal(enc2[0], ref_enc[2]) and torch.equal(enc2[1], ref_enc[1])
    # and gradients reach both encoders
    tiny_pipe.text_encoder.requires_grad_(True)
    tiny_pipe.text_encoder_2.requires_grad_(True)
    enc, pooled = text.encode(torch.tensor([0]))
    (enc.square().sum() + pooled.square().sum()).backward()
    assert tiny_pipe.text_encoder_2.shared.weight.grad.abs().sum() > 0
    assert tiny_pipe.text_encoder.get_input_embeddings().weight.grad.abs().sum() > 0
    tiny_pipe.text_encoder.requires_grad_(False).zero_grad()
    tiny_pipe.text_encoder_2.requires_grad_(False).zero_grad()


class _LinearInText(torch.nn.Module):
    """A stand-in flow model: v = hidden_states + mean of the text tokens (closed form for v_c, v_u)."""

    def forward(self, hidden_states, timestep, guidance, encoder_hidden_states, pooled_projections, txt_ids, img_ids,
                return_dict=False):
        assert torch.all(guidance == 1.0)
        return (hidden_states + encoder_hidden_states.mean(dim=(1, 2))[:, None, None],)


def test_cfg_velocity_closed_form():
    z = torch.randn(3, 4, 2)
    cond = (torch.full((3, 5, 6), 2.0), torch.zeros(3, 7))
    uncond = (torch.full((1, 5, 6), -1.0), torch.zeros(1, 7))
    w = torch.tensor([1.0, 3.0, 6.0])
    v = T.cfg_velocity(_LinearInText(), z, torch.rand(3), 1.0, cond, uncond, w, None, None)
    # v_c = z + 2, v_u = z − 1, so v_u + w·(v_c − v_u) = z − 1 + 3w
    assert torch.allclose(v, z + (3 * w - 1)[:, None, None])


def test_guidance_distillation_teaches_the_guidance_input(tiny_pipe):
    """A FLUX transformer distilled from a CFG teacher answers the guidance input with the CFG scale:
    s(g=5) − s(g=1) approaches 4·(v_c − v_u) on the training batch."""
    from model.flux_io import FluxConditioner

    torch.manual_seed(0)
    teacher = copy.deepcopy(tiny_pipe.transformer).eval()
    student = copy.deepcopy(teacher)
    cond = FluxConditioner(tiny_pipe, "cpu", 16)
    text = T._frozen_text(cond, ["a photo of a red square", "a photo of two green circles"], progress=False)
    latents = torch.randn(2, 64, 32)
    caption_index = torch.tensor([0, 1])
    txt_ids, img_ids = cond.encode_prompts([" "])[2], cond.image_ids(64, 64)
    config = replace(T.teacher_recipe("v2"), distill_steps=60, distill_batch_size=4, distill_warmup_steps=1,
                     distill_learning_rate=3e-3, caption_dropout=0.0, ema_decay=0.0)
    z = torch.randn(2, 64, 32)
    t = torch.full((2,), 0.6)

    def guidance_gap(model):
        with torch.no_grad():
            out = [model(hidden_states=z, timestep=t, guidance=torch.full((2,), g), encoder_hidden_states=text.embeds,
                         pooled_projections=text.pooled, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
                   for g in (1.0, 5.0)]
        return out[1] - out[0]

    with torch.no_grad():
        ones = torch.ones(2)
        want = 4 * (T.cfg_velocity(teacher, z, t, 1.0, (text.embeds, text.pooled),
                                   (text.uncond_embeds, text.uncond_pooled), 2 * ones, txt_ids, img_ids)
                    - T.cfg_velocity(teacher, z, t, 1.0, (text.embeds, text.pooled),
                                     (text.uncond_embeds, text.uncond_pooled), ones, txt_ids, img_ids))
    before = (guidance_gap(student) - want).norm() / want.norm()
    result = T.run_guidance_distillation(student, teacher, text, latents, caption_index, txt_ids, img_ids, config,
                                         progress=False)
    student.load_state_dict(result.ema["transformer"])
    after = (guidance_gap(student) - want).norm() / want.norm()
    assert after < 0.6 * before, (before, after)


def test_state_dir_refuses_other_settings_and_budget_needs_it(tmp_path, capsys):
    T._open_state_dir(tmp_path / "s", T.teacher_recipe("v2"))
    T._open_state_dir(tmp_path / "s", replace(T.teacher_recipe("v2"), eval_samples=5))  # eval settings: same build
    with pytest.raises(ValueError, match="other settings"):
        T._open_state_dir(tmp_path / "s", replace(T.teacher_recipe("v2"), steps=10))
    assert T.main(["--output_dir", str(tmp_path / "o"), "--max_minutes", "5"]) == 2
    assert "--state_dir" in capsys.readouterr().err
    with pytest.raises(ValueError, match="flow_guidance"):
        replace(T.teacher_recipe("v1"), distill_steps=5).validate()


def test_recipes_and_the_committed_key():
    assert T.teacher_recipe("v1") == T.TeacherConfig()
    v2 = T.teacher_recipe("v2")
    assert v2.train_text_encoders and v2.flow_guidance == 1.0 and v2.distill_steps > 0
    v4 = T.teacher_recipe("v4")
    assert v4.text_pretrain_steps > 0 and not v4.train_text_encoders and v4.distill_steps == v2.distill_steps
    # a build info written before the v2 fields existed keys like the v1 recipe
    old = {k: v for k, v in T.TeacherConfig().to_dict().items()
           if k not in ("train_text_encoders", "flow_guidance") and not k.startswith("distill_")}
    assert T._config_key(old) == T._config_key(T.teacher_recipe("v1").to_dict())
    assert T._config_key(old) != T._config_key(v2.to_dict())
    with pytest.raises(ValueError, match="unknown teacher recipe"):
        T.teacher_recipe("v9")


def _useful_rope_pairs(axis_dim: int, positions: int = 8, theta: float = 10000.0) -> int:
    """Frequency pairs of one RoPE axis (FLUX's ω_k = θ^(−2k/d)) whose angle across the grid is in [0.5, π]:
    they turn enough to tell positions apart and not so far that they wrap."""
    import math

    return sum(0.5 <= (positions - 1) * theta ** (-2 * k / axis_dim) <= math.pi for k in range(axis_dim // 2))


def test_v5_widens_the_rope_axes_at_the_same_width(tmp_path):
    from data.tiny_flux import build_tiny_flux_pipeline
    from diffusers import FluxTransformer2DModel

    v4, v5 = T.teacher_recipe("v4"), T.teacher_recipe("v5")
    assert v5.flux["num_attention_heads"] * v5.flux["attention_head_dim"] == (
        v4.flux["num_attention_heads"] * v4.flux["attention_head_dim"])
    assert sum(v5.flux["axes_dims_rope"]) == v5.flux["attention_head_dim"]
    assert (_useful_rope_pairs(v4.flux["axes_dims_rope"][1]), _useful_rope_pairs(v5.flux["axes_dims_rope"][1])) == (1, 3)
    # every field but the transformer's is v4's, so v4's VAE and text stage carry over
    assert T._vae_key(v5.to_dict()) == T._vae_key(v4.to_dict())
    assert {k: v for k, v in v5.to_dict().items() if k != "flux"} == {k: v for k, v in v4.to_dict().items() if k != "flux"}
    folder = build_tiny_flux_pipeline(tmp_path / "p", seed=0, config=tiny_flux_config(v5))
    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    assert transformer.config.attention_head_dim == 64 and list(transformer.config.axes_dims_rope) == [8, 28, 28]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def test_caption_targets_tell_binding_and_order_apart():
    from evaluation.shapes.domain import make_spec

    a = T.caption_targets(make_spec("two_object", "square", "red", "circle", "green"))
    b = T.caption_targets(make_spec("two_object", "circle", "red", "square", "green"))
    # shapes circle, square, triangle -> 1, 2, 3; colours red, green, ... -> 1, 2, ...; count; relation
    assert a == [2, 1, 1, 1, 2, 1, 0] and b == [1, 1, 1, 2, 2, 1, 0]
    left = T.caption_targets(make_spec("position", "circle", "red", "left of", "square", "blue"))
    assert left == [2, 3, 1, 1, 1, 1, 1]  # reference (blue square) first, subject second, "left of" = 1
    assert T.caption_targets(make_spec("counting", "triangle", "white", 3)) == [3, 6, 3, 0, 0, 0, 0]
    assert T.caption_targets(None) == [0] * len(T.CAPTION_HEADS)


def test_caption_probe_reads_the_t5_tokens_order_blind():
    """The T5 read-out cannot use token positions (as FLUX's transformer cannot), so only binding written
    into the tokens' content can solve the parsing task."""
    torch.manual_seed(0)
    probe = T._caption_probe_class()(32, 16)
    tokens, pooled = torch.randn(3, 16, 32), torch.randn(3, 16)
    logits, clip_logits = probe(tokens, pooled)
    permuted, _ = probe(tokens[:, torch.randperm(16)], pooled)
    assert torch.allclose(logits, permuted, atol=1e-5)
    assert logits.shape[1] == clip_logits.shape[1] == sum(n for _, n in T.CAPTION_HEADS)
    loss = T.caption_probe_loss(logits, torch.zeros(3, len(T.CAPTION_HEADS), dtype=torch.long))
    assert loss.item() > 0 and loss.requires_grad



def test_weighted_flow_batches_follow_the_tag_weights():
    """Rows are drawn in proportion to their tag's weight (unnamed tags weigh 1); no weights: the uniform draw."""
    from evaluation.shapes.teacher_build.flow import tag_row_weights

    tags = ["position"] * 10 + ["colors"] * 30
    weights = tag_row_weights(tags, {"position": 3.0})
    assert weights.tolist() == [3.0] * 10 + [1.0] * 30
    latents, index = torch.arange(40.0)[:, None, None], torch.arange(40)
    text = T.FrozenText(torch.zeros(40, 2, 4), torch.zeros(40, 4), torch.zeros(1, 2, 4), torch.zeros(1, 4))
    gen = torch.Generator().manual_seed(0)
    x0 = T.draw_flow_batch(gen, latents, index, text, 4000, 0.0, weights)[0].flatten()
    share = (x0 < 10).float().mean().item()  # expected 30 / (30 + 30) = 0.5; uniform would give 0.25
    assert abs(share - 0.5) < 0.03, share
    x0 = T.draw_flow_batch(gen, latents, index, text, 4000, 0.0)[0].flatten()
    assert abs((x0 < 10).float().mean().item() - 0.25) < 0.03


def test_shifted_flow_times_match_the_closed_form():
    """SD3's shift t ↦ s·t / (1 + (s − 1)·t) of the half logit-normal, half uniform draw: the share of times above
    0.9 is, with u* = 0.9 / (s − (s − 1)·0.9) the unshifted time that lands on 0.9,
    ½·P(sigmoid(z) > u*) + ½·(1 − u*) = ½·(1 − Φ(logit u*)) + ½·(1 − u*). Shift 1 is the old draw, bit for bit."""
    import math

    from evaluation.shapes.teacher_build.flow import sample_flow_times, shift_flow_times

    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert shift_flow_times(t, 1.0) is t
    assert torch.allclose(shift_flow_times(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    unshifted = sample_flow_times(200_000, torch.Generator().manual_seed(0))
    again = sample_flow_times(200_000, torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(unshifted, again)
    shifted = sample_flow_times(200_000, torch.Generator().manual_seed(0), 3.0)
    inside = (unshifted > 1e-3) & (unshifted < 1 - 1e-3)  # the unshifted draw is clamped to [1e-4, 1 - 1e-4]
    assert torch.allclose(shifted[inside], shift_flow_times(unshifted[inside], 3.0), atol=1e-6)

    def share_above(threshold: float, s: float) -> float:
        u = threshold / (s - (s - 1) * threshold)
        normal_tail = 0.5 * math.erfc(math.log(u / (1 - u)) / math.sqrt(2))
        return 0.5 * normal_tail + 0.5 * (1 - u)

    for s, draw in ((1.0, unshifted), (3.0, shifted)):
        assert abs((draw > 0.9).float().mean().item() - share_above(0.9, s)) < 0.004, s
    assert share_above(0.9, 3.0) > 3 * share_above(0.9, 1.0)  # the point of v6: 3.4x the layout-deciding times


def test_v6_is_v4_with_shifted_flow_times():
    v4, v6 = T.teacher_recipe("v4"), T.teacher_recipe("v6")
    assert v6.flow_time_shift == 3.0 and v4.flow_time_shift == 1.0
    assert {k: v for k, v in v6.to_dict().items() if k != "flow_time_shift"} == {
        k: v for k, v in v4.to_dict().items() if k != "flow_time_shift"}
    # build infos written before the field existed keep their key (the committed v4 teacher is reused)
    old = {k: v for k, v in v4.to_dict().items() if k != "flow_time_shift"}
    assert T._config_key(old) == T._config_key(v4.to_dict()) != T._config_key(v6.to_dict())
    with pytest.raises(ValueError, match="flow_time_shift must be > 0"):
        replace(v4, flow_time_shift=0.0).validate()


def test_v7_is_v6_with_tag_weighted_flow_rows():
    """v7 draws position rows 4x and counting rows 2x in flow matching; the build reads each row's tag from its
    metadata; no weights (v1–v6) keeps the uniform draw, and older build infos keep their key."""
    import json

    from evaluation.shapes.teacher_build.build import _row_weights

    v6, v7 = T.teacher_recipe("v6"), T.teacher_recipe("v7")
    assert v7.flow_tag_weights == {"position": 4.0, "counting": 2.0} and v6.flow_tag_weights == {}
    assert {k: v for k, v in v7.to_dict().items() if k != "flow_tag_weights"} == {
        k: v for k, v in v6.to_dict().items() if k != "flow_tag_weights"}
    old = {k: v for k, v in v6.to_dict().items() if k != "flow_tag_weights"}
    assert T._config_key(old) == T._config_key(v6.to_dict()) != T._config_key(v7.to_dict())
    rows = [{"metadata": json.dumps({"tag": tag})} for tag in ("position", "counting", "colors", "position")]
    assert _row_weights(rows, v7).tolist() == [4.0, 2.0, 1.0, 4.0]
    assert _row_weights(rows, v6) is None
    with pytest.raises(ValueError, match="unknown tags \\['postion'\\]"):
        replace(v6, flow_tag_weights={"postion": 2.0}).validate()
    with pytest.raises(ValueError, match="finite and >= 0"):
        replace(v6, flow_tag_weights={"position": -1.0}).validate()
    with pytest.raises(ValueError, match="some tag > 0"):
        replace(v6, flow_tag_weights={tag: 0.0 for tag in ("single_object", "two_object", "counting", "colors",
                                                          "position", "color_attr")}).validate()


@pytest.mark.slow
def test_v3_build_stopped_and_resumed_equals_an_uninterrupted_one(tmp_path):
    config = replace(T.teacher_recipe("v3"), num_images=24, vae_steps=2, vae_batch_size=4, steps=4, batch_size=4,
                     warmup_steps=1, distill_steps=4, distill_batch_size=4, distill_warmup_steps=1,
                     text_pretrain_steps=4, text_pretrain_batch_size=4,
                     eval_prompts_per_tag=1, eval_samples=1, eval_steps=2, eval_batch_size=6)
    straight = T.build_teacher(tmp_path / "a", config, progress=False, state_dir=tmp_path / "sa")
    statuses = []
    while True:
        info = T.build_teacher(tmp_path / "b", config, progress=False, state_dir=tmp_path / "sb",
                               budget=T.Budget(max_steps=3))
        statuses.append(info.get("status", "complete"))
        if statuses[-1] == "complete":
            break
        assert not (tmp_path / "b").exists()  # a paused build publishes nothing
        if len(statuses) in (1, 2):  # an unfinished build can be snapshotted and loads as a FluxPipeline
            from diffusers import FluxPipeline

            where = T.snapshot_pipeline(tmp_path / "sb", tmp_path / f"snap{len(statuses)}")
            stage = "text_pretraining" if len(statuses) == 1 else "flow_matching"
            assert where == {"stage": stage, "step": 3, "total": 4}
            assert FluxPipeline.from_pretrained(tmp_path / f"snap{len(statuses)}").transformer.config.guidance_embeds
    # text 3/4; text 1 + flow 3/4; flow 1 + distill 3/4; distill 1
    assert statuses == ["paused", "paused", "paused", "complete"]
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    assert set(_hashes(tmp_path / "a")) >= {"transformer/diffusion_pytorch_model.safetensors",
                                            "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"}
    assert straight["evaluation"]["total_images"] == 6
    assert set(straight["evaluation"]["at_guidance_1"]["tasks"]) == set(straight["evaluation"]["tasks"])
    # a snapshot of the finished state is the published teacher
    T.snapshot_pipeline(tmp_path / "sa", tmp_path / "snap_a")
    snap = _hashes(tmp_path / "snap_a")
    assert all(snap[k] == v for k, v in _hashes(tmp_path / "a").items()), "snapshot differs from the build"
    # the text encoders were trained: they differ from the skeleton's random ones
    assert _hashes(tmp_path / "a")["text_encoder_2/model.safetensors"] != _hashes(
        Path(T.__file__).resolve().parents[2] / "assets" / "shapes_teacher")["text_encoder_2/model.safetensors"]


def test_text_binding_report_shows_random_encoders_lose_binding(tiny_pipe):
    """The diagnosis of issue 12: with random frozen CLIP/T5 (as the v1 teacher's), swapping which
    colour goes with which shape leaves the set of token vectors the transformer receives almost
    unchanged, while changing a word does not."""
    from evaluation.shapes.diagnose import text_binding_report

    report = text_binding_report(tiny_pipe)
    by_kind: dict[str, list[dict]] = {}
    for row in report:
        by_kind.setdefault(row["kind"], []).append(row)
    assert all(r["bag_cosine"] > 0.99 for r in by_kind["binding"] + by_kind["relation order"])
    assert all(r["bag_cosine"] < 0.9 for r in by_kind["colour word"] + by_kind["count word"])
    # the swapped tokens themselves do differ position by position (T5 sees the change; the bag hides it)
    assert all(r["changed_token_cosine"] < 0.5 for r in by_kind["binding"])
