"""training/launch.py build_models: the transformer weights are read once per run.

Reference: the previous way, two independent loads of the same files (one per role), which must give the
same teacher and student; the reads are counted at the loaders (``from_pretrained`` and ``read_checkpoint``).
"""
from __future__ import annotations

import types

import pytest
import torch

from fault_injection import scm_args, scm_method
from model import loading
from model.transformer import DistillFluxTransformer2DModel
from training import launch


@pytest.fixture
def reads(monkeypatch) -> dict[str, int]:
    """Counts of transformer loads (``from_pretrained``) and checkpoint file reads during the test."""
    counts = {"from_pretrained": 0, "read_checkpoint": 0}
    load, read = DistillFluxTransformer2DModel.from_pretrained.__func__, loading.read_checkpoint

    def counted_load(cls, *a, **k):
        counts["from_pretrained"] += 1
        return load(cls, *a, **k)

    def counted_read(*a, **k):
        counts["read_checkpoint"] += 1
        return read(*a, **k)

    monkeypatch.setattr(DistillFluxTransformer2DModel, "from_pretrained", classmethod(counted_load))
    monkeypatch.setattr(loading, "read_checkpoint", counted_read)
    return counts


def _accelerator(mixed_precision: str = "no"):
    return types.SimpleNamespace(device=torch.device("cpu"), mixed_precision=mixed_precision)


def _perturbed_checkpoint(pipe, path):
    """A 'rescaled' checkpoint that differs from the pipeline's weights (so taking it is visible)."""
    model = loading.load_flux_transformer(str(pipe), 1000.0)
    torch.manual_seed(0)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    torch.save({"module": state, "config": dict(model.config)}, path)
    return state


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_full_student_teacher_is_an_independent_copy_read_once(tiny_assets, tmp_path, reads, mixed_precision):
    pipe, data = tiny_assets
    rescaled = _perturbed_checkpoint(pipe, tmp_path / "rescaled.pt")
    args = scm_args(pipe, data, tmp_path / "out", rescaled_checkpoint_path=tmp_path / "rescaled.pt")
    reads.update(from_pretrained=0, read_checkpoint=0)
    student, teacher, student_tf = launch.build_models(args, scm_method(args), _accelerator(mixed_precision))
    assert reads == {"from_pretrained": 1, "read_checkpoint": 1}

    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    old_teacher, old_student = (launch.load_base_transformer(args) for _ in range(2))  # the previous path
    old_teacher.to(dtype)
    teacher_tf = teacher.transformer
    for mine, old in ((teacher_tf, old_teacher), (student_tf, old_student)):
        ours, theirs = mine.state_dict(), old.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)
    assert torch.equal(student_tf.state_dict()["x_embedder.weight"], rescaled["x_embedder.weight"])
    assert type(teacher_tf.transformer_blocks[0].attn.processor) is type(old_teacher.transformer_blocks[0].attn.processor)
    # Independent: no storage shared, the teacher frozen, and a student update leaves it alone.
    student_ptrs = {p.data_ptr() for p in student_tf.parameters()}
    assert not student_ptrs & {p.data_ptr() for p in teacher_tf.parameters()}
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        student_tf.x_embedder.weight.add_(1.0)
    assert torch.equal(teacher_tf.x_embedder.weight, old_teacher.x_embedder.weight)


def test_lora_student_and_teacher_share_the_one_copy(tiny_assets, tmp_path, reads):
    pipe, data = tiny_assets
    args = scm_args(pipe, data, tmp_path / "out", lora_rank=4)
    student, teacher, student_tf = launch.build_models(args, scm_method(args), _accelerator())
    assert reads["from_pretrained"] == 1
    # The teacher owns no tensors: it runs the student's own transformer with the adapters switched off.
    assert teacher.transformer is student_tf and not list(teacher.parameters())


def test_flow_matching_rescale_copies_no_teacher(tiny_assets, tmp_path, reads, monkeypatch):
    import train_rescale
    from training.rescale import RescaleLoss, RescaleLossConfig, RescaleMethod

    pipe, data = tiny_assets
    copies = []
    monkeypatch.setattr(launch, "frozen_copy", lambda *a: copies.append(a) or pytest.fail("teacher copied"))
    args = train_rescale.parse_args(["--pretrained_model_name_or_path", str(pipe), "--data_dir", str(data),
                                     "--output_dir", str(tmp_path / "out"), "--objective", "flow_matching"])
    method = RescaleMethod(RescaleLoss(RescaleLossConfig(objective="flow_matching")))
    student, teacher, _ = launch.build_models(args, method, _accelerator())
    assert isinstance(teacher, torch.nn.Identity) and not copies and reads["from_pretrained"] == 1
    assert student.timestep_scale == 1.0
