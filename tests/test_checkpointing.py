"""Pruning of lightweight exports (numeric step order, other files untouched)."""
from __future__ import annotations

from training import checkpointing as ckpt


def test_prune_exports_keeps_newest_by_step_number(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for step in (2, 4, 10, 30):  # "transformer_10" < "transformer_4" as strings: order must be numeric
        (ckpts / f"transformer_{step}.pt").write_bytes(b"x")
    (ckpts / "notes.txt").write_text("keep me")
    ckpt.prune_exports(tmp_path, 2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["notes.txt", "transformer_10.pt", "transformer_30.pt"]
    ckpt.prune_exports(tmp_path, None)  # no limit: nothing removed
    assert len(list(ckpts.iterdir())) == 3


def test_nonpositive_retention_limits_are_refused_up_front(tmp_path):
    import pytest

    from train_sCM import parse_args

    base = ["--pretrained_model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "run"),
            "--timestep_scale", "1000"]
    for flag in ("--checkpoints_total_limit", "--exports_total_limit"):
        with pytest.raises(ValueError, match=f"{flag} 0 must be >= 1"):
            parse_args(base + [flag, "0"])
        assert getattr(parse_args(base + [flag, "2"]), flag[2:]) == 2
    assert not (tmp_path / "run").exists()
