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
