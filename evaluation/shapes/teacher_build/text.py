"""Text conditioning of the teacher build: precomputed (frozen) or trained CLIP/T5 encoders through
``FluxPipeline.encode_prompt``'s own path, and the caption-parsing pretraining of the encoders (recipes v3, v4)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

from evaluation.shapes.teacher_build.common import UNCONDITIONAL_PROMPT, progress_bar, warmup_cosine_lr
from evaluation.shapes.teacher_build.optim import Budget, StageResult, optimise
from evaluation.shapes.teacher_build.recipes import TeacherConfig


def encode_captions(conditioner, captions: Sequence[str], batch_size: int = 256, progress: bool = True):
    """Unique captions → (T5 embeddings [U, L, D], CLIP pooled [U, P], index of every caption)."""
    import torch

    unique = sorted(set(captions))
    lookup = {c: i for i, c in enumerate(unique)}
    embeds, pooled = [], []
    bar = progress_bar(len(unique), "text embeddings", progress)
    for start in range(0, len(unique), batch_size):
        e, p, _ = conditioner.encode_prompts(unique[start:start + batch_size])
        embeds.append(e)
        pooled.append(p)
        bar.update(len(e))
    bar.close()
    index = torch.tensor([lookup[c] for c in captions], dtype=torch.long)
    return torch.cat(embeds), torch.cat(pooled), index



class FrozenText:
    """Precomputed text conditioning: rows of ``embeds``/``pooled`` per caption, the unconditional
    prompt's where the caption is dropped."""

    def __init__(self, embeds, pooled, uncond_embeds, uncond_pooled):
        self.embeds, self.pooled = embeds, pooled
        self.uncond_embeds, self.uncond_pooled = uncond_embeds, uncond_pooled

    def __call__(self, caption: "torch.Tensor", drop: "torch.Tensor"):
        import torch

        enc, pooled = self.embeds[caption], self.pooled[caption]
        enc = torch.where(drop[:, None, None], self.uncond_embeds.expand_as(enc), enc)
        pooled = torch.where(drop[:, None], self.uncond_pooled.expand_as(pooled), pooled)
        return enc, pooled


class TrainableText:
    """Text conditioning through the pipeline's own CLIP and T5 encoders, with gradients.

    Token ids are computed once with the pipeline's tokenizers and the arguments of
    ``FluxPipeline.encode_prompt`` (CLIP: padded/truncated to 77, ``pooler_output``; T5: padded/truncated to
    ``max_sequence_length``, last hidden state), so after training ``FluxPipeline`` encodes a caption exactly
    as this class did. The last row is the unconditional prompt.
    """

    def __init__(self, pipe, captions: Sequence[str], max_sequence_length: int):
        self.clip, self.t5 = pipe.text_encoder, pipe.text_encoder_2
        prompts = list(captions) + [UNCONDITIONAL_PROMPT]
        self.clip_ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer_max_length,
                                       truncation=True, return_tensors="pt").input_ids
        self.t5_ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=max_sequence_length,
                                       truncation=True, return_tensors="pt").input_ids
        self.uncond = len(prompts) - 1

    def encode(self, rows: "torch.Tensor"):
        """(T5 hidden states [B, L, D], CLIP pooled [B, P]) of caption rows ``rows``."""
        enc = self.t5(self.t5_ids[rows], output_hidden_states=False)[0]
        pooled = self.clip(self.clip_ids[rows], output_hidden_states=False).pooler_output
        return enc.float(), pooled.float()

    def __call__(self, caption: "torch.Tensor", drop: "torch.Tensor"):
        import torch

        return self.encode(torch.where(drop, torch.full_like(caption, self.uncond), caption))



def frozen_text(conditioner, unique: Sequence[str], progress: bool) -> FrozenText:
    """Precomputed embeddings of the (sorted) unique captions and of the unconditional prompt."""
    embeds, pooled, _ = encode_captions(conditioner, unique, progress=progress)
    uncond_embeds, uncond_pooled, _ = conditioner.encode_prompts([UNCONDITIONAL_PROMPT])
    return FrozenText(embeds, pooled, uncond_embeds, uncond_pooled)


#: Read-out heads of :class:`CaptionProbe`: (name, classes); class 0 = "absent".
CAPTION_HEADS: tuple[tuple[str, int], ...] = (
    ("shape_0", 4), ("color_0", 7), ("count_0", 5), ("shape_1", 4), ("color_1", 7), ("count_1", 5), ("relation", 5))


def caption_targets(spec: Optional[dict]) -> list[int]:
    """Class indices of :data:`CAPTION_HEADS` for a GenEval metadata dict (None: the unconditional prompt).

    Objects are taken in the metadata's include order (for position prompts: reference, then subject), so
    a caption and its binding- or order-swapped twin have different targets.
    """
    from evaluation.shapes.domain import COLORS, RELATIONS, SHAPES

    include = spec["include"] if spec else []
    out = []
    for slot in range(2):
        obj = include[slot] if slot < len(include) else None
        out += [SHAPES.index(obj["class"]) + 1 if obj else 0, COLORS.index(obj["color"]) + 1 if obj else 0,
                int(obj["count"]) if obj else 0]
    relation = next((o["position"][0] for o in include if "position" in o), None)
    out.append(RELATIONS.index(relation) + 1 if relation else 0)
    return out


def caption_probe_class():
    """The :class:`CaptionProbe` class (defined on first use, so importing this module needs no torch)."""
    import torch
    from torch import nn

    class CaptionProbe(nn.Module):
        """Order-blind read-out of the T5 tokens (learned queries attending over them, no positions, as
        FLUX's joint attention reads text) and a linear read-out of the pooled CLIP vector, each predicting
        :data:`CAPTION_HEADS`. Used only to pretrain the encoders; discarded afterwards."""

        def __init__(self, t5_dim: int, clip_dim: int, heads: int = 4):
            super().__init__()
            self.queries = nn.Parameter(torch.randn(3, t5_dim) / math.sqrt(t5_dim))  # slot 0, slot 1, relation
            self.attention = nn.MultiheadAttention(t5_dim, heads, batch_first=True)
            sizes = [n for _, n in CAPTION_HEADS]
            self.slot_out = nn.Linear(t5_dim, sum(sizes[:3]))
            self.relation_out = nn.Linear(t5_dim, sizes[6])
            self.clip_out = nn.Linear(clip_dim, sum(sizes))

        def forward(self, t5_tokens, pooled):
            q = self.queries.expand(t5_tokens.shape[0], -1, -1)
            read, _ = self.attention(q, t5_tokens, t5_tokens, need_weights=False)
            t5_logits = torch.cat([self.slot_out(read[:, 0]), self.slot_out(read[:, 1]),
                                   self.relation_out(read[:, 2])], dim=-1)
            return t5_logits, self.clip_out(pooled)

    return CaptionProbe


def caption_probe_loss(logits: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """Sum over :data:`CAPTION_HEADS` of the cross-entropy of the concatenated ``logits``."""
    import torch.nn.functional as F

    loss, start = 0.0, 0
    for k, (_, n) in enumerate(CAPTION_HEADS):
        loss = loss + F.cross_entropy(logits[:, start:start + n], targets[:, k])
        start += n
    return loss


def run_text_pretraining(text: "TrainableText", targets: "torch.Tensor", config: TeacherConfig,
                         checkpoint: Optional[Path] = None, budget: Optional[Budget] = None, progress: bool = True,
                         log: Optional[Callable[[dict], None]] = None) -> StageResult:
    """Caption-parsing pretraining of ``text``'s CLIP and T5 (see ``TeacherConfig.text_pretrain_steps``):
    ``L = CE(probe(T5 tokens)) + CE(probe(pooled CLIP))`` over the rows of ``targets`` (one per caption of
    ``text``, the unconditional prompt last). The probe is seeded from ``config.seed`` and discarded."""
    import torch

    torch.manual_seed(config.seed * 7919 + 4)
    probe = caption_probe_class()(text.t5.config.d_model, text.clip.config.hidden_size)
    gen = torch.Generator().manual_seed(config.seed * 7919 + 5)
    rows = targets.shape[0]

    def lr_at(step: int) -> float:
        return warmup_cosine_lr(step, config.text_pretrain_steps, max(1, config.text_pretrain_steps // 20),
                                config.text_pretrain_learning_rate, config.min_lr_ratio)

    def loss_fn(step: int):
        idx = torch.randint(rows, (config.text_pretrain_batch_size,), generator=gen)
        t5_logits, clip_logits = probe(*text.encode(idx))
        return caption_probe_loss(t5_logits, targets[idx]) + caption_probe_loss(clip_logits, targets[idx])

    modules = {"text_encoder": text.clip, "text_encoder_2": text.t5, "probe": probe}
    return optimise("text_pretrain", modules, loss_fn, config.text_pretrain_steps, lr_at, gen, config, checkpoint,
                    budget, progress, log)
