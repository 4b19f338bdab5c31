"""evaluation/shapes/position_pilot.py: the caption swaps and placement targets by hand, the grown transformer
computes the same function, bad input is refused, and a micro fine-tune + swap-loss run on a tiny teacher."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from evaluation.shapes import position_pilot as P
from evaluation.shapes.domain import make_spec


def test_caption_swaps_by_hand():
    caption = "a photo of a green triangle left of a red circle"
    assert P.relation_swapped(caption) == "a photo of a green triangle right of a red circle"
    assert P.objects_swapped(caption) == "a photo of a red circle left of a green triangle"
    assert P.subject_recoloured(caption) == "a photo of a blue triangle left of a red circle"  # first colour unused
    above = make_spec("position", "square", "blue", "above", "circle", "white")["prompt"]
    assert P.relation_swapped(above) == above.replace(" above ", " below ")
    assert P.relation_swapped(P.relation_swapped(above)) == above
    with pytest.raises(ValueError, match="not a position caption"):
        P.relation_swapped("a photo of a red circle and a blue square")


def test_placement_targets_by_hand():
    """Subject words carry the relation, reference words its opposite; every other token, and every token of a
    non-position prompt, 0 (classes: 1 + index in RELATIONS = left of, right of, above, below)."""
    spec = make_spec("position", "triangle", "green", "left of", "circle", "red")
    assert spec["prompt"] == "a photo of a green triangle left of a red circle"
    tokens = ["\u2581" + w for w in spec["prompt"].split()] + ["</s>", "<pad>"]
    assert P.placement_targets(tokens, spec) == [0, 0, 0, 0, 1, 1, 0, 0, 0, 2, 2, 0, 0]
    above = make_spec("position", "square", "blue", "above", "circle", "white")
    assert P.placement_targets(above["prompt"].split(), above) == [0, 0, 0, 0, 3, 3, 0, 0, 4, 4]
    two = make_spec("two_object", "square", "red", "circle", "green")
    assert set(P.placement_targets(two["prompt"].split(), two)) == {0}
    with pytest.raises(ValueError, match="4 object words"):
        P.placement_targets(spec["prompt"].split()[:6], spec)  # a truncated caption


def test_tag_weights_are_parsed_and_checked():
    assert P.parse_tag_weights("position=4, counting=2") == {"position": 4.0, "counting": 2.0}
    assert P.parse_tag_weights("") == {}
    for bad in ("positions=2", "position", "position=-1",
                "single_object=0,two_object=0,counting=0,colors=0,position=0,color_attr=0"):
        with pytest.raises(ValueError, match="--tag_weights"):
            P.parse_tag_weights(bad)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from diffusers import FluxPipeline

    from data.tiny_flux import build_tiny_flux_pipeline
    from evaluation.shapes.teacher_build.recipes import teacher_recipe, tiny_flux_config

    folder = build_tiny_flux_pipeline(tmp_path_factory.mktemp("pilot") / "p", seed=0,
                                      config=tiny_flux_config(teacher_recipe("v4")))
    return folder, FluxPipeline.from_pretrained(folder, dtype=torch.float32)


def _forward(transformer, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 64, transformer.config.in_channels, generator=g)
    text = torch.randn(2, 16, transformer.config.joint_attention_dim, generator=g)
    pooled = torch.randn(2, transformer.config.pooled_projection_dim, generator=g)
    ids = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).reshape(64, 2)
    img_ids = torch.cat([torch.zeros(64, 1), ids], dim=1)
    with torch.no_grad():
        return transformer(hidden_states=hidden, timestep=torch.tensor([0.3, 0.8]), guidance=torch.tensor([1.0, 4.0]),
                           encoder_hidden_states=text, pooled_projections=pooled, txt_ids=torch.zeros(16, 3),
                           img_ids=img_ids, return_dict=False)[0]


def test_grown_transformer_computes_the_same_function(tiny_teacher):
    """adaLN-Zero blocks appended after the old ones are the identity: same outputs, more parameters; the new
    blocks still learn (their modulation gets a gradient)."""
    transformer = tiny_teacher[1].transformer
    for p in transformer.parameters():  # a trained-looking model: nonzero modulation everywhere
        p.data.add_(0.02 * torch.randn_like(p))
    grown = P.grow_transformer(transformer, 1, 2)
    assert len(grown.transformer_blocks) == len(transformer.transformer_blocks) + 1
    assert len(grown.single_transformer_blocks) == len(transformer.single_transformer_blocks) + 2
    torch.testing.assert_close(_forward(grown), _forward(transformer), rtol=1e-5, atol=1e-6)
    grown.requires_grad_(True)
    with torch.enable_grad():
        g = torch.Generator().manual_seed(1)
        hidden = torch.randn(1, 64, grown.config.in_channels, generator=g)
        ids = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).reshape(64, 2)
        out = grown(hidden_states=hidden, timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]),
                    encoder_hidden_states=torch.randn(1, 16, grown.config.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(1, grown.config.pooled_projection_dim, generator=g),
                    txt_ids=torch.zeros(16, 3), img_ids=torch.cat([torch.zeros(64, 1), ids], 1), return_dict=False)[0]
        out.square().mean().backward()
    assert grown.single_transformer_blocks[-1].norm.linear.weight.grad.abs().sum() > 0


def test_micro_finetune_and_swap_losses(tiny_teacher, tmp_path):
    """A few fine-tuning steps change the transformer; the swap losses differ only through the caption: a
    transformer made blind to the text (text projections zeroed) gives all four the same loss."""
    from evaluation.shapes.teacher_build.recipes import teacher_recipe

    folder, _ = tiny_teacher
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
    config = replace(teacher_recipe("v4"), num_images=24, batch_size=4)
    data = P.PilotData(pipe, config, progress=False)
    assert data.latents.shape[0] == 24 and len(data.specs) == len(data.unique)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    history = P.finetune(pipe, data, 3, 1e-3, {"position": 4.0}, checkpoint=tmp_path / "ft.pt")
    assert (tmp_path / "ft.pt").is_file() and [h["step"] for h in history] == [3]  # every 50 steps and the last
    changed = [k for k, v in pipe.transformer.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    losses = P.swap_losses(pipe, images=3, times=(0.7,), repeats=1)
    row = losses["0.7"]
    assert set(row) == {"true", "relation_swapped", "objects_swapped", "subject_recoloured", "unconditional"}
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values())
    assert row["true"] != row["relation_swapped"]  # random encoders: the swapped caption is another input
    with torch.no_grad():
        for layer in (pipe.transformer.context_embedder, pipe.transformer.time_text_embed.text_embedder.linear_2):
            layer.weight.zero_()
            layer.bias.zero_()
    blind = P.swap_losses(pipe, images=3, times=(0.7,), repeats=1)["0.7"]
    assert len(set(blind.values())) == 1, blind


def test_cli_refuses_a_folder_that_is_not_a_pipeline(tmp_path, capsys):
    with pytest.raises(ValueError, match="not a FluxPipeline folder"):
        P.main(["swap", "--teacher", str(tmp_path)])
    with pytest.raises(ValueError, match="--grow"):
        (tmp_path / "model_index.json").write_text("{}")
        P.main(["finetune", "--teacher", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--grow", "1"])


def test_score_samples_only_the_pilot_tags_and_breaks_them_down(tiny_teacher, tmp_path):
    report = P.score(tiny_teacher[1], tmp_path, cfg=2.0, prompts_per_tag=1, samples=1)
    assert report["images"] == len(P.SCORED_TAGS) and set(report["tasks"]) == set(P.SCORED_TAGS)
    assert (tmp_path / "samples" / "cfg_2" / "results.jsonl").is_file()
    assert report["failures"]["position_images"] == 1 and report["failures"]["counting_images"] == 1


def test_finetune_refuses_an_output_dir_of_other_flags(tmp_path):
    """A fine-tuning resumes the folder's finetune.pt, so a folder of another run is refused, not continued."""
    out = tmp_path / "o"
    P._claim_output_dir(out, {"steps": 10, "tag_weights": ""})
    P._claim_output_dir(out, {"steps": 10, "tag_weights": ""})  # the same run: resumable
    with pytest.raises(ValueError, match="other flags \\(tag_weights\\)"):
        P._claim_output_dir(out, {"steps": 10, "tag_weights": "position=4"})
