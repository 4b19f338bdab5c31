"""A tiny, randomly initialised FLUX pipeline and a tiny image-caption dataset, built offline.

Everything here runs on CPU in a few seconds with no network access. The pipeline folder uses
the same diffusers/transformers classes as a real FLUX checkpoint (e.g. ``Freepik/flux.1-lite-8B``),
so code that loads FLUX with ``FluxPipeline.from_pretrained(folder)`` can be exercised end to end
on a laptop:

* ``FluxTransformer2DModel`` (guidance-distilled variant: ``guidance_embeds=True``),
* ``AutoencoderKL`` with the FLUX layout (16 latent channels, scale factor 8 by default),
* ``CLIPTextModel`` + ``CLIPTokenizer`` and ``T5EncoderModel`` + ``T5TokenizerFast``; the
  tokenizers are *trained locally* on a built-in English word list (no downloaded vocab),
* ``FlowMatchEulerDiscreteScheduler`` with the FLUX.1-dev settings.

Builds are seeded and bitwise reproducible. Folders are written into a temporary sibling
directory and renamed into place, so an interrupted build never leaves a folder that looks
complete.

Command line::

    python -m data.tiny_flux --output_dir OUT [--seed 0] [--num_images 32] [--resolution 64] [--force]

writes ``OUT/tiny-flux/`` (the pipeline) and ``OUT/tiny-data/`` (a parquet image-caption
dataset with columns ``image`` and ``llava``).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "TinyFluxConfig",
    "build_tiny_flux_pipeline",
    "build_tiny_dataset",
    "ensure_tiny_assets",
    "tokenizer_corpus",
    "PIPELINE_DIRNAME",
    "DATASET_DIRNAME",
    "main",
]

PIPELINE_DIRNAME = "tiny-flux"
DATASET_DIRNAME = "tiny-data"
BUILD_INFO_FILENAME = "tiny_build_info.json"
PARQUET_FILENAME = "train.parquet"

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TinyFluxConfig:
    """Sizes of every component of the tiny FLUX pipeline.

    Defaults give a ~0.3M-parameter pipeline with the FLUX layout (VAE scale factor 8,
    16 latent channels packed 2x2 into 64 transformer input channels). Constraints, checked by
    :meth:`validate`: ``sum(axes_dims_rope) == attention_head_dim``,
    ``pooled_projection_dim == clip_hidden_size`` (FLUX feeds the CLIP pooled output),
    ``joint_attention_dim == t5_d_model`` (FLUX feeds the T5 hidden states) and every VAE
    channel count divisible by ``vae_norm_num_groups``.
    """

    # FluxTransformer2DModel
    num_layers: int = 2  # double-stream blocks
    num_single_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    joint_attention_dim: int = 32
    pooled_projection_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    guidance_embeds: bool = True
    # AutoencoderKL (FLUX-like)
    vae_block_out_channels: list[int] = field(default_factory=lambda: [8, 8, 16, 16])
    latent_channels: int = 16
    vae_norm_num_groups: int = 4
    vae_layers_per_block: int = 1
    vae_scaling_factor: float = 0.3611
    vae_shift_factor: float = 0.1159
    # CLIPTextModel
    clip_hidden_size: int = 32
    clip_intermediate_size: int = 64
    clip_num_layers: int = 2
    clip_num_heads: int = 2
    clip_max_position_embeddings: int = 77
    clip_vocab_size: int = 2048  # upper bound for the BPE vocabulary; the model uses len(tokenizer)
    # T5EncoderModel
    t5_d_model: int = 32
    t5_d_kv: int = 8
    t5_d_ff: int = 64
    t5_num_layers: int = 2
    t5_num_heads: int = 4
    t5_feed_forward_proj: str = "gated-gelu"
    t5_model_max_length: int = 512
    # FlowMatchEulerDiscreteScheduler (FLUX.1-dev)
    scheduler_shift: float = 3.0
    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    @property
    def vae_scale_factor(self) -> int:
        """Spatial down-sampling of the VAE: ``2 ** (len(vae_block_out_channels) - 1)``."""
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def transformer_in_channels(self) -> int:
        """FLUX packs 2x2 latent patches: ``4 * latent_channels``."""
        return 4 * self.latent_channels

    def validate(self) -> None:
        """Raise ``ValueError`` if the sizes are inconsistent."""
        errors = []
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            errors.append(
                f"sum(axes_dims_rope)={sum(self.axes_dims_rope)} must equal attention_head_dim={self.attention_head_dim}"
            )
        if self.pooled_projection_dim != self.clip_hidden_size:
            errors.append(
                f"pooled_projection_dim={self.pooled_projection_dim} must equal clip_hidden_size={self.clip_hidden_size}"
            )
        if self.joint_attention_dim != self.t5_d_model:
            errors.append(f"joint_attention_dim={self.joint_attention_dim} must equal t5_d_model={self.t5_d_model}")
        if not self.vae_block_out_channels:
            errors.append("vae_block_out_channels must not be empty")
        bad = [c for c in self.vae_block_out_channels if c % self.vae_norm_num_groups]
        if bad:
            errors.append(f"vae_block_out_channels {bad} not divisible by vae_norm_num_groups={self.vae_norm_num_groups}")
        if self.clip_hidden_size % self.clip_num_heads:
            errors.append("clip_hidden_size must be divisible by clip_num_heads")
        if errors:
            raise ValueError("invalid TinyFluxConfig: " + "; ".join(errors))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d


# --------------------------------------------------------------------------------------------
# Built-in word list (tokenizer training corpus)
# --------------------------------------------------------------------------------------------

# The 80 object categories used by GenEval (the COCO categories).
OBJECT_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "remote", "computer keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray")
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below", "next to", "on top of", "behind", "in front of")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
EXTRA_WORDS = (
    "a an the of photo picture image background with and on in is are there small large big tiny "
    "shape shapes colour color gradient plain simple drawing top bottom middle center centre side "
    "from to near far light dark bright sitting standing lying holding"
)

# Colours actually used to draw the tiny dataset (name -> RGB).
_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
_BACKGROUNDS = ("white", "black", "gray")
_BACKGROUND_RGB = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(word: str) -> str:
    irregular = {"person": "people", "computer mouse": "computer mice", "knife": "knives", "sheep": "sheep", "skis": "skis",
                 "scissors": "scissors", "tv": "tvs", "hair drier": "hair driers"}
    if word in irregular:
        return irregular[word]
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    return word + "s"


def tokenizer_corpus() -> Iterator[str]:
    """A fixed, ordered English corpus covering GenEval-style prompts and the shape captions.

    Used to train the tiny CLIP (BPE) and T5 (Unigram) tokenizers, so frequent prompt words are
    single tokens. Deterministic: the same sentences in the same order every call.
    """
    words = list(OBJECT_NAMES) + list(COLORS) + list(NUMBERS) + list(SHAPES) + EXTRA_WORDS.split()
    words += [_plural(o) for o in OBJECT_NAMES] + [s + "s" for s in SHAPES] + list(RELATIONS)
    for _ in range(3):  # repeat so whole words win the merges
        yield " ".join(words)
    for i, obj in enumerate(OBJECT_NAMES):
        art = _article(obj)
        color = COLORS[i % len(COLORS)]
        num = NUMBERS[i % 4 + 1]
        other = OBJECT_NAMES[(i * 7 + 3) % len(OBJECT_NAMES)]
        rel = RELATIONS[i % 4]
        yield f"a photo of {art} {obj}"
        yield f"a photo of {_article(color)} {color} {obj}"
        yield f"a photo of {num} {_plural(obj)}"
        yield f"a photo of a {obj} {rel} a {other}"
        yield f"a photo of a {obj} and a {other}"
    for c in COLORS:
        for s in SHAPES:
            for bg in _BACKGROUNDS:
                yield f"{_article(c)} {c} {s} on a {bg} background"
                yield f"two {c} {s}s on a {bg} background"
    for a in COLORS:
        yield f"a gradient from {a} to blue"


# --------------------------------------------------------------------------------------------
# Atomic directory helpers
# --------------------------------------------------------------------------------------------


def _tmp_sibling(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _publish(tmp: Path, target: Path, overwrite: bool = True) -> Path:
    """Rename the finished ``tmp`` directory to ``target``.

    If ``target`` exists and ``overwrite`` is true it is moved aside and deleted after the
    rename; if ``overwrite`` is false the existing ``target`` wins and ``tmp`` is discarded
    (another process finished first).
    """
    old = None
    if target.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        # a concurrent builder published first (rename onto a non-empty dir fails): keep theirs
        if not target.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------


def _build_tokenizers(config: TinyFluxConfig):
    from transformers import CLIPTokenizer, T5TokenizerFast

    # transformers v5: a no-file constructor gives an empty tokenizer that already has the right
    # normaliser / pre-tokenizer / post-processor; training fills the vocabulary.
    vocab, merges = _clip_bpe_vocab(config.clip_vocab_size)
    clip_tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=config.clip_max_position_embeddings)
    t5_tok = T5TokenizerFast(vocab=_t5_unigram_vocab(), model_max_length=config.t5_model_max_length)
    _check_tokenizers(clip_tok, t5_tok)
    return clip_tok, t5_tok


def _clip_bpe_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Deterministic byte-level BPE vocabulary and merges for the tiny CLIP tokenizer.

    Layout as in OpenAI CLIP: the 256 byte symbols, the same with ``</w>``, the merged tokens,
    then ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids. Merges are learnt here by
    plain BPE on the corpus words with ties broken lexicographically: the ``tokenizers`` BPE
    trainer breaks frequency ties in hash-map order, so two trainings in one process gave
    different ids, which would break bitwise-reproducible builds.
    """
    from collections import Counter

    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer  # exact CLIP normaliser + pre-tokenizer
    words: Counter[str] = Counter()
    for sentence in tokenizer_corpus():
        normalized = backend.normalizer.normalize_str(sentence)
        words.update(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalized))

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for sym in alphabet + [a + "</w>" for a in alphabet]:
        vocab[sym] = len(vocab)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    max_merges = max(0, vocab_size - len(vocab) - len(specials))

    entries = [([*w[:-1], w[-1] + "</w>"], words[w]) for w in sorted(words)]
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for syms, freq in entries:
            for pair in zip(syms, syms[1:]):
                pairs[pair] += freq
        if not pairs:  # every word is a single token
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        merged = best[0] + best[1]
        vocab.setdefault(merged, len(vocab))
        for syms, _ in entries:
            i = 0
            while i < len(syms) - 1:
                if syms[i] == best[0] and syms[i + 1] == best[1]:
                    syms[i : i + 2] = [merged]
                i += 1
    for sym in specials:
        vocab[sym] = len(vocab)
    return vocab, merges


def _t5_unigram_vocab() -> list[tuple[str, float]]:
    """SentencePiece-style Unigram vocabulary for the tiny T5 tokenizer.

    Ids 0/1/2 are ``<pad>``/``</s>``/``<unk>`` as in T5. Every corpus word is one piece
    ``"\u2581word"`` scored by its log frequency; single characters (with and without the word
    boundary marker) are fallbacks with much lower scores, so any ASCII text tokenizes. (The
    Unigram *trainer* of ``tokenizers`` on a corpus this small splits even "of"/"two" into
    characters, hence this direct construction.) The 100 ``<extra_id_*>`` sentinels are appended
    after this vocabulary by ``T5TokenizerFast``, as in the real T5.
    """
    import math
    import string
    from collections import Counter

    counts = Counter(w for sentence in tokenizer_corpus() for w in sentence.split())
    total = sum(counts.values())
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    for word, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab.append(("\u2581" + word, math.log(c / total)))
    floor = min(s for _, s in vocab) - 10.0
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    seen = {p for p, _ in vocab}
    for ch in chars:
        for piece in (ch, "\u2581" + ch):
            if piece not in seen:
                vocab.append((piece, floor))
                seen.add(piece)
    return vocab


def _check_tokenizers(clip_tok, t5_tok, min_size: int = 50) -> None:
    """Sanity checks that catch a tokenizer silently built from missing files (2 tokens)."""
    if len(clip_tok) < min_size or len(t5_tok) < min_size:
        raise RuntimeError(f"tiny tokenizers too small: len(clip)={len(clip_tok)}, len(t5)={len(t5_tok)}")
    ids = clip_tok("a photo of a cat").input_ids
    if ids[0] != clip_tok.bos_token_id or ids[-1] != clip_tok.eos_token_id:
        raise RuntimeError(f"CLIP tokenizer does not wrap text in bos/eos: {ids}")
    ids = t5_tok("a photo of a cat").input_ids
    if ids[-1] != t5_tok.eos_token_id or t5_tok.eos_token != "</s>":
        raise RuntimeError(f"T5 tokenizer does not end text with </s>: {ids}")


def build_tiny_flux_pipeline(
    output_dir: str | Path, seed: int = 0, config: TinyFluxConfig | None = None, *, overwrite: bool = True
) -> Path:
    """Build a tiny random FLUX pipeline and save it to ``output_dir``.

    An existing ``output_dir`` is replaced, or, with ``overwrite=False``, kept (the new build is
    discarded; this makes concurrent builders safe).

    The folder loads with ``diffusers.FluxPipeline.from_pretrained(output_dir)`` offline. Every
    component is created right after ``torch.manual_seed(seed)``, so two builds with the same seed
    give bitwise-identical weights. The folder also holds ``tiny_build_info.json`` (seed and
    config). Returns the folder path.
    """
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    config = config or TinyFluxConfig()
    config.validate()
    output_dir = Path(output_dir).resolve()

    clip_tok, t5_tok = _build_tokenizers(config)

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=config.transformer_in_channels,
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.joint_attention_dim,
        pooled_projection_dim=config.pooled_projection_dim,
        guidance_embeds=config.guidance_embeds,
        axes_dims_rope=tuple(config.axes_dims_rope),
    )

    torch.manual_seed(seed)
    n = len(config.vae_block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(config.vae_block_out_channels),
        layers_per_block=config.vae_layers_per_block,
        act_fn="silu",
        latent_channels=config.latent_channels,
        norm_num_groups=config.vae_norm_num_groups,
        sample_size=1024,
        scaling_factor=config.vae_scaling_factor,
        shift_factor=config.vae_shift_factor,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )

    torch.manual_seed(seed)
    clip_config = CLIPTextConfig(
        vocab_size=len(clip_tok),
        hidden_size=config.clip_hidden_size,
        intermediate_size=config.clip_intermediate_size,
        num_hidden_layers=config.clip_num_layers,
        num_attention_heads=config.clip_num_heads,
        max_position_embeddings=config.clip_max_position_embeddings,
        projection_dim=config.clip_hidden_size,
        hidden_act="quick_gelu",
        bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id,
    )
    text_encoder = CLIPTextModel(clip_config)

    torch.manual_seed(seed)
    t5_config = T5Config(
        vocab_size=len(t5_tok),
        d_model=config.t5_d_model,
        d_kv=config.t5_d_kv,
        d_ff=config.t5_d_ff,
        num_layers=config.t5_num_layers,
        num_decoder_layers=config.t5_num_layers,
        num_heads=config.t5_num_heads,
        feed_forward_proj=config.t5_feed_forward_proj,
        pad_token_id=t5_tok.pad_token_id,
        eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id,
        is_encoder_decoder=True,
        tie_word_embeddings=False,
    )
    text_encoder_2 = T5EncoderModel(t5_config)

    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=config.scheduler_shift,
        use_dynamic_shifting=config.use_dynamic_shifting,
        base_shift=config.base_shift,
        max_shift=config.max_shift,
        base_image_seq_len=config.base_image_seq_len,
        max_image_seq_len=config.max_image_seq_len,
    )

    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    tmp = _tmp_sibling(output_dir)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        info = {"seed": seed, "config": config.to_dict(), "builder": "data.tiny_flux.build_tiny_flux_pipeline"}
        (tmp / BUILD_INFO_FILENAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        return _publish(tmp, output_dir, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=rgb)
    else:  # pragma: no cover
        raise ValueError(shape)


def _make_sample(rng: np.random.Generator, resolution: int) -> tuple[Image.Image, str]:
    """One deterministic image + caption: 1 or 2 shapes, or a horizontal gradient."""
    r = resolution
    kind = rng.integers(0, 6)
    colors = list(_PALETTE)
    if kind == 0:  # gradient between two distinct colours
        a, b = rng.choice(len(colors), size=2, replace=False)
        ca, cb = np.array(_PALETTE[colors[a]], np.float32), np.array(_PALETTE[colors[b]], np.float32)
        t = np.linspace(0.0, 1.0, r, dtype=np.float32)[None, :, None]
        arr = np.broadcast_to(ca * (1 - t) + cb * t, (r, r, 3))
        return Image.fromarray(np.round(arr).astype(np.uint8), "RGB"), f"a gradient from {colors[a]} to {colors[b]}"
    bg = _BACKGROUNDS[rng.integers(0, len(_BACKGROUNDS))]
    fg_choices = [c for c in colors if c != bg]
    color = fg_choices[rng.integers(0, len(fg_choices))]
    shape = SHAPES[rng.integers(0, len(SHAPES))]
    img = Image.new("RGB", (r, r), _BACKGROUND_RGB[bg])
    draw = ImageDraw.Draw(img)
    count = 2 if kind == 5 else 1
    if count == 1:
        size = int(rng.integers(r // 3, (2 * r) // 3 + 1))
        x0 = int(rng.integers(0, r - size + 1))
        y0 = int(rng.integers(0, r - size + 1))
        _draw_shape(draw, shape, (x0, y0, x0 + size - 1, y0 + size - 1), _PALETTE[color])
        return img, f"{_article(color)} {color} {shape} on a {bg} background"
    half = r // 2
    for left in (0, half):
        size = int(rng.integers(max(2, half // 2), half - 1))
        x0 = left + int(rng.integers(0, half - size + 1))
        y0 = int(rng.integers(0, r - size + 1))
        _draw_shape(draw, shape, (x0, y0, x0 + size - 1, y0 + size - 1), _PALETTE[color])
    return img, f"two {color} {shape}s on a {bg} background"


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def build_tiny_dataset(
    output_dir: str | Path,
    num_images: int = 32,
    resolution: int = 64,
    seed: int = 0,
    format: str = "parquet",
    *,
    overwrite: bool = True,
) -> Path:
    """Write a small deterministic image-caption dataset to ``output_dir``.

    An existing ``output_dir`` is replaced, or kept with ``overwrite=False``.

    Images are coloured shapes (circle / square / triangle, one or two) on white, black or gray
    backgrounds, or two-colour gradients, with matching captions such as
    ``"a red circle on a white background"``. The caption column is ``llava`` (the default caption
    column of the original release).

    ``format="parquet"``: ``output_dir/train.parquet`` with features
    ``{"image": Image(), "llava": Value("string")}`` and the PNG bytes embedded.
    ``format="imagefolder"``: ``output_dir/00000.png ...`` plus ``metadata.jsonl`` rows
    ``{"file_name": ..., "llava": ...}``. Returns ``output_dir``.
    """
    if format not in ("parquet", "imagefolder"):
        raise ValueError(f"format must be 'parquet' or 'imagefolder', got {format!r}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    output_dir = Path(output_dir).resolve()
    rng = np.random.default_rng(seed)
    samples = [_make_sample(rng, resolution) for _ in range(num_images)]

    tmp = _tmp_sibling(output_dir)
    try:
        tmp.mkdir(parents=True)
        if format == "parquet":
            import datasets

            features = datasets.Features({"image": datasets.Image(), "llava": datasets.Value("string")})
            records = {
                "image": [{"bytes": _png_bytes(img), "path": f"{i:05d}.png"} for i, (img, _) in enumerate(samples)],
                "llava": [cap for _, cap in samples],
            }
            ds = datasets.Dataset.from_dict(records, features=features)
            ds.to_parquet(str(tmp / PARQUET_FILENAME))
        else:
            with open(tmp / "metadata.jsonl", "w") as f:
                for i, (img, cap) in enumerate(samples):
                    name = f"{i:05d}.png"
                    (tmp / name).write_bytes(_png_bytes(img))
                    f.write(json.dumps({"file_name": name, "llava": cap}) + "\n")
        info = {"seed": seed, "num_images": num_images, "resolution": resolution, "format": format}
        (tmp / BUILD_INFO_FILENAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        return _publish(tmp, output_dir, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Build-once helpers + CLI
# --------------------------------------------------------------------------------------------


def _read_info(folder: Path) -> dict | None:
    try:
        return json.loads((folder / BUILD_INFO_FILENAME).read_text())
    except (OSError, ValueError):
        return None


def _dataset_complete(folder: Path) -> bool:
    return (folder / PARQUET_FILENAME).is_file() or (folder / "metadata.jsonl").is_file()


def ensure_tiny_assets(
    root: str | Path,
    seed: int = 0,
    num_images: int = 32,
    resolution: int = 64,
    force: bool = False,
    verbose: bool = False,
) -> tuple[Path, Path]:
    """Build ``root/tiny-flux`` and ``root/tiny-data`` (parquet) once; reuse them afterwards.

    The pipeline is reused when ``root/tiny-flux/model_index.json`` exists and the dataset when
    its parquet / metadata file exists, unless ``force``. Reuse ignores ``seed`` / ``num_images``
    / ``resolution`` (a warning is printed with ``verbose`` when they differ from the recorded
    build). Safe to call from a session-scoped pytest fixture. Returns
    ``(pipeline_dir, dataset_dir)``.
    """
    root = Path(root).resolve()
    pipe_dir, data_dir = root / PIPELINE_DIRNAME, root / DATASET_DIRNAME
    say = print if verbose else (lambda *a, **k: None)

    if (pipe_dir / "model_index.json").is_file() and not force:
        info = _read_info(pipe_dir) or {}
        say(f"reusing tiny FLUX pipeline at {pipe_dir} (pass --force to rebuild)")
        if info.get("seed", seed) != seed:
            say(f"  warning: it was built with seed={info.get('seed')}; pass --force to rebuild with seed={seed}")
    else:
        t0 = time.perf_counter()
        # an existing folder without model_index.json is broken: replace it
        build_tiny_flux_pipeline(pipe_dir, seed=seed, overwrite=force or pipe_dir.exists())
        say(f"built tiny FLUX pipeline at {pipe_dir} in {time.perf_counter() - t0:.1f} s")

    if _dataset_complete(data_dir) and not force:
        info = _read_info(data_dir) or {}
        say(f"reusing tiny dataset at {data_dir} (pass --force to rebuild)")
        wanted = {"seed": seed, "num_images": num_images, "resolution": resolution}
        diff = {k: info[k] for k in wanted if k in info and info[k] != wanted[k]}
        if diff:
            recorded = ", ".join(f"{k}={v}" for k, v in diff.items())
            say(f"  warning: it was built with {recorded}; pass --force to rebuild with the requested values")
    else:
        t0 = time.perf_counter()
        build_tiny_dataset(
            data_dir, num_images=num_images, resolution=resolution, seed=seed, overwrite=force or data_dir.exists()
        )
        say(f"built tiny dataset ({num_images} images, {resolution}px) at {data_dir} in {time.perf_counter() - t0:.1f} s")
    return pipe_dir, data_dir


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data.tiny_flux",
        description=(
            "Build a tiny, randomly initialised FLUX pipeline (OUTPUT_DIR/tiny-flux, loadable with "
            "diffusers.FluxPipeline.from_pretrained) and a tiny image-caption dataset (OUTPUT_DIR/tiny-data, "
            "a parquet file with columns 'image' and 'llava'). Runs offline on CPU in seconds."
        ),
    )
    p.add_argument("--output_dir", required=True, help="folder that receives tiny-flux/ and tiny-data/")
    p.add_argument("--seed", type=int, default=0, help="seed for the model weights and the images (default: 0)")
    p.add_argument("--num_images", type=int, default=32, help="number of image-caption pairs (default: 32)")
    p.add_argument("--resolution", type=int, default=64, help="side of the square images in pixels (default: 64)")
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild even if OUTPUT_DIR/tiny-flux/model_index.json (or the dataset) already exists; "
        "without it existing folders are reused",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see ``python -m data.tiny_flux --help``."""
    args = _parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    pipe_dir, data_dir = ensure_tiny_assets(
        args.output_dir,
        seed=args.seed,
        num_images=args.num_images,
        resolution=args.resolution,
        force=args.force,
        verbose=True,
    )
    print(f"pipeline: {pipe_dir}")
    print(f"dataset:  {data_dir}")
    return 0


if __name__ == "__main__":
    from training.cli import run_cli

    sys.exit(run_cli(main))  # bad input: one line, status 2
