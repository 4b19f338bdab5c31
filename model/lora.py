"""LoRA students tied to their teacher: one copy of the FLUX weights, adapters on for the student, off for the teacher.

Student:  W_student = W + (α/r)·B·A  on the chosen Linear layers of the transformer blocks (peft LoRA through
          diffusers' ``PeftAdapterMixin.add_adapter``), plus the method's new heads trained in full (sCM's
          ``logvar_linear`` lives in the TrigFlow wrapper; MeanFlow's interval embedder MLP_h lives in
          ``time_text_embed``).  Everything else is frozen.
Teacher:  the *same* module with the adapters disabled, MLP_h skipped and the teacher's own time scale, i.e.
          exactly the base weights the student started from.  With ``--rescaled_checkpoint_path`` the base IS
          the rescaled (×1) teacher, so "adapters off" is that teacher; for teacher rescaling the base is stock
          FLUX and the teacher view also restores ``timestep_scale`` 1000 while the student runs at ×1.

Since B is zero-initialised, the student starts equal to its base (up to MLP_h, as without LoRA).

On disk (a folder, :func:`save_lora_folder`):
    pytorch_lora_weights.safetensors  diffusers' Flux LoRA format (keys ``transformer.<module>.lora_A/B.weight``,
                                      peft config in the metadata): ``FluxPipeline.load_lora_weights(folder)``
                                      and ``transformer.load_lora_adapter(folder, prefix="transformer")`` read it
    heads.safetensors                 the fully trained heads (``time_text_embed.interval_embedder.*``,
                                      ``logvar_linear.*``); absent when there are none
    lora_info.json                    the base it applies to (pipeline, rescaled checkpoint, time scale), method, step
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .transformer import DistillFluxTransformer2DModel

ADAPTER_NAME = "student"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
HEADS_WEIGHTS = "heads.safetensors"
LORA_INFO = "lora_info.json"
INTERVAL_PREFIX = "time_text_embed.interval_embedder."
#: Linear layers of FLUX's double- and single-stream blocks (attention projections and MLPs).
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                          "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                          "proj_out")
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


class LoraError(ValueError):
    """A LoRA setting or folder that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class LoraSpec:
    """``--lora_rank``, ``--lora_alpha`` (default = rank, i.e. scale 1), ``--lora_target_modules``, ``--lora_dropout``."""

    rank: int
    alpha: float | None = None
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank < 1:
            raise LoraError(f"--lora_rank {self.rank} must be >= 1")
        if self.alpha is not None and not self.alpha > 0:
            raise LoraError(f"--lora_alpha {self.alpha} must be > 0 (the LoRA scale is alpha / rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"--lora_dropout {self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise LoraError("--lora_target_modules is empty; e.g. to_q,to_k,to_v,to_out.0")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


def resolve_target_modules(transformer: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Full names of the Linear layers inside the transformer blocks whose name ends with one of ``patterns``.

    ``all`` selects every Linear of the blocks.  Restricting the match to the blocks keeps a suffix such as
    ``proj_out`` from also catching the final output layer, and the trained-in-full heads out of the LoRA.
    """
    linears = [name for name, module in transformer.named_modules()
               if isinstance(module, nn.Linear) and name.startswith(BLOCK_PREFIXES)]
    if "all" in patterns:
        return linears
    chosen = [name for name in linears if any(name == p or name.endswith("." + p) for p in patterns)]
    unused = [p for p in patterns if not any(n == p or n.endswith("." + p) for n in linears)]
    if unused:
        examples = sorted({n.split(".", 2)[-1] for n in linears})[:8]
        raise LoraError(f"--lora_target_modules {','.join(unused)} match no Linear layer of the transformer blocks "
                        f"(layer names look like {', '.join(examples)}; or pass 'all')")
    return chosen


def add_student_adapter(transformer: DistillFluxTransformer2DModel, spec: LoraSpec) -> list[str]:
    """Freeze ``transformer`` and add the trainable LoRA adapter; returns the adapted layer names.

    The MeanFlow interval embedder, when present, stays trainable in full (it is a new head).
    """
    from peft import LoraConfig

    if getattr(transformer, "_hf_peft_config_loaded", False):
        raise LoraError("the transformer already carries a LoRA adapter")
    targets = resolve_target_modules(transformer, spec.target_modules)
    transformer.requires_grad_(False)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.dropout, target_modules=targets,
                        init_lora_weights=True)  # A Kaiming-uniform, B = 0: the student starts at its base
    transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
    head_parameters(transformer, trainable=True)
    return targets


def head_parameters(transformer: nn.Module, trainable: bool | None = None) -> dict[str, nn.Parameter]:
    """Parameters of the heads inside the transformer (MeanFlow's interval embedder), optionally (un)frozen."""
    embedder = getattr(transformer.time_text_embed, "interval_embedder", None)
    if embedder is None:
        return {}
    params = {INTERVAL_PREFIX + name: p for name, p in embedder.named_parameters()}
    if trainable is not None:
        for p in params.values():
            p.requires_grad_(trainable)
    return params


def has_lora(transformer: nn.Module) -> bool:
    return bool(getattr(transformer, "_hf_peft_config_loaded", False))


@contextlib.contextmanager
def teacher_mode(transformer: DistillFluxTransformer2DModel, timestep_scale: float) -> Iterator[None]:
    """Within the block, ``transformer`` computes its base model: adapters off, no interval embedding, the
    teacher's ``timestep_scale``.  Everything is restored afterwards (also on errors).

    diffusers' ``disable_adapters``/``enable_adapters`` also toggle ``requires_grad`` of the adapter weights
    (peft's ``enable_adapters``); re-enabling makes the active adapter trainable again, as it was.
    """
    embed = transformer.time_text_embed
    saved_scale, saved_interval = embed.timestep_scale, embed.interval_enabled
    if has_lora(transformer):
        transformer.disable_adapters()
    embed.timestep_scale, embed.interval_enabled = float(timestep_scale), False
    try:
        yield
    finally:
        embed.timestep_scale, embed.interval_enabled = saved_scale, saved_interval
        if has_lora(transformer):
            transformer.enable_adapters()


class TiedTeacher(nn.Module):
    """The method's teacher wrapper, evaluated with the shared transformer in :func:`teacher_mode`.

    The wrapper and transformer are held outside ``_modules``: the teacher owns no parameters, so
    ``teacher.requires_grad_(False)``, ``.to(dtype)`` or ``.eval()`` cannot touch the student's weights.
    """

    def __init__(self, wrapper: nn.Module, transformer: DistillFluxTransformer2DModel, timestep_scale: float):
        super().__init__()
        object.__setattr__(self, "wrapper", wrapper)
        object.__setattr__(self, "transformer", transformer)
        self.timestep_scale = float(timestep_scale)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def forward(self, *args, **kwargs):
        with teacher_mode(self.transformer, self.timestep_scale):
            return self.wrapper(*args, **kwargs)


def count_parameters(module: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts (each shared tensor counted once)."""
    seen, total, trainable = set(), 0, 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"total": total, "trainable": trainable}


# ---------------------------------------------------------------------------------------------------------
# Weights: adapter state, fused weights, the on-disk folder
# ---------------------------------------------------------------------------------------------------------

def adapter_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA A/B weights in peft/diffusers naming (``<module>.lora_A.weight``, no adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)


def fused_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The plain transformer's state dict with every adapted weight replaced by W + (α/r)·B·A.

    Computed out of place (merging in place and unmerging again would not restore W bit for bit in bf16),
    in the weight's dtype after a float32 sum.  Keys are those of the model without peft layers.
    """
    from peft.tuners.lora import LoraLayer

    state = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = base.weight.detach()
            delta = module.get_delta_weight(ADAPTER_NAME) if ADAPTER_NAME in module.lora_A else 0
            state[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype) if torch.is_tensor(delta) else weight
            if base.bias is not None:
                state[f"{name}.bias"] = base.bias.detach()
    for key, value in transformer.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        state.setdefault(plain, value.detach())
    return state


def is_lora_folder(path: str | os.PathLike | None) -> bool:
    return path is not None and Path(path).is_dir() and (Path(path) / LORA_WEIGHTS).is_file()


def save_lora_folder(folder: str | os.PathLike, transformer: nn.Module, heads: dict[str, torch.Tensor],
                     info: dict) -> Path:
    """Write adapter + heads + info into ``folder`` (under a temporary name, renamed when complete)."""
    from diffusers import FluxPipeline

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        layers = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(transformer).items()}
        metadata = transformer.peft_config[ADAPTER_NAME].to_dict()
        FluxPipeline.save_lora_weights(tmp, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata,
                                       weight_name=LORA_WEIGHTS)
        if heads:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in heads.items()}, tmp / HEADS_WEIGHTS)
        (tmp / LORA_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@dataclass
class LoraFolder:
    """What :func:`read_lora_folder` found."""

    path: str
    info: dict
    heads: dict[str, torch.Tensor]

    @property
    def base(self) -> tuple[str | None, str | None]:
        """(pretrained pipeline, rescaled checkpoint) the adapter was trained on."""
        return self.info.get("pretrained_model_name_or_path"), self.info.get("rescaled_checkpoint_path")


def read_lora_folder(path: str | os.PathLike) -> LoraFolder:
    path = Path(path)
    if not is_lora_folder(path):
        raise LoraError(f"{path} is not a LoRA folder (expected {LORA_WEIGHTS} inside)")
    info = json.loads((path / LORA_INFO).read_text()) if (path / LORA_INFO).is_file() else {}
    heads = load_file(path / HEADS_WEIGHTS) if (path / HEADS_WEIGHTS).is_file() else {}
    return LoraFolder(str(path), info, heads)


def apply_lora_folder(transformer: DistillFluxTransformer2DModel, folder: LoraFolder, fuse: bool = False) -> None:
    """Load the adapter (diffusers' ``load_lora_adapter``) and the interval head into ``transformer``.

    ``fuse``: merge W + (α/r)·B·A into the base weights and remove the peft layers (a plain transformer).
    The sCM ``logvar_linear`` head is a training-time weight and is not needed for sampling.
    """
    interval = {k[len(INTERVAL_PREFIX):]: v for k, v in folder.heads.items() if k.startswith(INTERVAL_PREFIX)}
    if interval:
        transformer.enable_interval_embedding("zero")
        embedder = transformer.time_text_embed.interval_embedder
        missing, unexpected = embedder.load_state_dict(interval, strict=False)
        if missing or unexpected:
            raise LoraError(f"{folder.path}/{HEADS_WEIGHTS} does not fit the interval embedder "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        embedder.to(transformer.dtype)
    transformer.load_lora_adapter(folder.path, prefix="transformer", adapter_name=ADAPTER_NAME,
                                  weight_name=LORA_WEIGHTS)
    if fuse:
        transformer.fuse_lora(adapter_names=[ADAPTER_NAME])
        transformer.unload_lora()


def load_lora_student(folder_path: str | os.PathLike, pretrained_model_name_or_path: str | None = None, *,
                      base_checkpoint: str | None = None, dtype: torch.dtype = torch.float32,
                      revision: str | None = None, fuse: bool = False) -> tuple[DistillFluxTransformer2DModel, LoraFolder]:
    """The student of a LoRA folder: its base (pipeline transformer + the run's rescaled checkpoint, or
    ``base_checkpoint``), the heads, and the adapter (fused into the weights with ``fuse``).

    The base must be the one the adapter was trained on; the folder records it in ``lora_info.json``.
    """
    from .loading import load_flux_transformer, load_transformer_weights

    folder = read_lora_folder(folder_path)
    recorded_pipe, recorded_base = folder.base
    pipe = pretrained_model_name_or_path or recorded_pipe
    base = base_checkpoint or recorded_base
    config = folder.info.get("transformer_config") or {}
    scale = float(config.get("timestep_scale", 1.0))
    if pipe is None:
        raise LoraError(f"{folder.path} does not name its FLUX pipeline: pass --pretrained_model_name_or_path")
    if base is not None and not Path(base).exists():
        raise LoraError(f"the base of {folder.path} ({base}, the run's --rescaled_checkpoint_path) does not exist "
                        "here: pass the same rescaled teacher with --lora_base")
    transformer = load_flux_transformer(pipe, scale, revision=revision)
    if base is not None:
        load_transformer_weights(transformer, base)
    apply_lora_folder(transformer, folder, fuse=fuse)
    transformer.to(dtype).eval().requires_grad_(False)
    return transformer, folder


def lora_parameter_count(config: dict, spec: LoraSpec, interval_embedding: bool = False) -> dict[str, int]:
    """Parameters of a LoRA student of the FLUX ``config`` (built on the meta device: no memory).

    ``trainable`` = the adapter + the interval embedder when ``interval_embedding`` (MeanFlow); ``total`` =
    everything held in memory for student and teacher together (one base).
    """
    with torch.device("meta"):
        model = DistillFluxTransformer2DModel(**config, interval_embedding=interval_embedding)
        add_student_adapter(model, spec)
    return count_parameters(model)
