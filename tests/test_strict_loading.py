"""Loading is strict in both directions: a checkpoint with parts the receiving model does not have (an sCM
logvar head, a MeanFlow interval embedder) is refused, naming what the file is and which entry point takes it,
instead of being silently cut down; through the trainers: exit 2, one line, no output folder."""
from __future__ import annotations

import pytest
import torch

from model.loading import CheckpointError, load_flux_transformer, load_transformer_weights
from training.checkpointing import export_transformer
from training.cli import run_cli


@pytest.fixture(scope="module")
def exports(tiny_assets, tmp_path_factory):
    """An sCM student export (with logvar head) and a MeanFlow student export (with interval embedder)."""
    pipe, _ = tiny_assets
    root = tmp_path_factory.mktemp("strict")
    tf = load_flux_transformer(str(pipe), 1.0)
    state = dict(tf.state_dict())
    teacher = root / "rescaled.pt"
    export_transformer(teacher, state, dict(tf.config), 0)
    state["logvar_linear.weight"], state["logvar_linear.bias"] = torch.randn(1, tf.inner_dim), torch.zeros(1)
    export_transformer(root / "sCM" / "ckpts" / "transformer_4.pt", state, dict(tf.config), 4)
    tf.enable_interval_embedding("copy")
    export_transformer(root / "MeanFlow" / "ckpts" / "transformer_4.pt", tf.state_dict(), dict(tf.config), 4)
    return dict(pipe=pipe, teacher=teacher, scm=root / "sCM" / "ckpts" / "transformer_4.pt",
                meanflow=root / "MeanFlow" / "ckpts" / "transformer_4.pt")


def test_loader_refuses_parts_the_model_would_drop(exports):
    fresh = lambda: load_flux_transformer(str(exports["pipe"]), 1.0)  # noqa: E731
    with pytest.raises(CheckpointError, match=r"is an sCM student export \(it has an sCM logvar_linear head\) and "
                                              r"cannot be loaded by --rescaled_checkpoint_path"):
        load_transformer_weights(fresh(), str(exports["scm"]))
    with pytest.raises(CheckpointError, match=r"is a MeanFlow student .* Sample it with test_meanflow.py"):
        load_transformer_weights(fresh(), str(exports["meanflow"]))
    with pytest.raises(CheckpointError, match="is a MeanFlow student"):
        load_transformer_weights(fresh(), str(exports["meanflow"]), expect="scm")
    with pytest.raises(CheckpointError, match="is an sCM student export"):
        load_transformer_weights(fresh(), str(exports["scm"]), expect="meanflow")
    with pytest.raises(CheckpointError, match="not a MeanFlow student checkpoint"):
        load_transformer_weights(fresh(), str(exports["teacher"]), expect="meanflow")
    # What each kind accepts: the teacher as a teacher, each student as its own method.
    load_transformer_weights(fresh(), str(exports["teacher"]))
    assert set(load_transformer_weights(fresh(), str(exports["scm"]), expect="scm").auxiliary) == {
        "logvar_linear.weight", "logvar_linear.bias"}
    model = fresh()
    load_transformer_weights(model, str(exports["meanflow"]), expect="meanflow")
    assert model.config.interval_embedding


def _train(entry: str, exports, data, rescaled, out, capsys) -> tuple[int, str]:
    import importlib

    main = importlib.import_module(entry).main
    argv = ["--pretrained_model_name_or_path", str(exports["pipe"]), "--rescaled_checkpoint_path", str(rescaled),
            "--data_dir", str(data), "--resolution", "32", "--train_batch_size", "2",
            "--max_train_steps", "1", "--output_dir", str(out), "--report_to", "tensorboard"]
    code = run_cli(lambda: main(argv))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    return code, errors[0]


@pytest.mark.parametrize("entry,student,first_line", [
    ("train_meanflow", "scm", "is an sCM student export (it has an sCM logvar_linear head) and cannot be loaded by "
                              "--rescaled_checkpoint_path"),
    ("train_sCM", "meanflow", "is a MeanFlow student (it has an interval (t - r) embedder"),
], ids=["scm_export_into_meanflow", "meanflow_student_into_scm"])
def test_trainers_refuse_a_student_as_the_rescaled_teacher(exports, tiny_assets, tmp_path, capsys, entry, student,
                                                           first_line):
    out = tmp_path / "run"
    code, error = _train(entry, exports, tiny_assets[1], exports[student], out, capsys)
    assert code == 2
    assert error.startswith(f"error: {exports[student]} {first_line}"), error
    assert not out.exists()  # no logs/, no tracker files
