"""Precomputed conditioning: T5 + CLIP prompt embeddings and VAE latents of a dataset, in shards.

Written once by ``python -m data.encode_conditioning`` (``script/encode_conditioning.sh``), read by the
trainers' ``--conditioning_cache DIR``, which then never load the text encoders or the VAE: at FLUX
scale that frees T5-XXL (4.7 B parameters), CLIP-L and the VAE from every training GPU and their
forwards from every step.

Layout of ``DIR``::

    cache.json                what was encoded (pipeline and its identity, encoder dtype, resolution, T5 length,
                              crops/flips, seed, variants, dataset flags, shard size, sample count) — checked
                              against the trainer's flags (:func:`check_cache_matches_args`)
    uncond.safetensors        the embeddings of " " (MeanFlow's unconditional prompt), same encoders
    shard-00000.safetensors   samples [0, shard_size), ... each with
                                index          [n] int64       dataset index
                                valid          [n] uint8       0: unreadable sample (reason in the metadata)
                                prompt_embeds  [V, n, L, D]    T5 tokens, per variant
                                pooled         [V, n, P]       CLIP pooled, per variant
                                latents        [V, n, N, C]    packed (VAE mean − shift)·scale, per variant

Variant v holds the sample as the on-the-fly pipeline would produce it in epoch v (random crop, flip
and caption choice are seeded by (seed, epoch, index)), so a run whose epochs stay below the number of
variants sees exactly the same latents and embeddings; epoch e ≥ V reuses variant e mod V.  With the
default centre crop, no flip and one caption column every epoch is identical and one variant suffices.
Embeddings are stored in the dtype the encoders ran in (``--dtype``: the trainer's precision), so they
are bit-identical to what the trainer would have computed; latents are float32 (the VAE runs in fp32).

Which encoders made a cache (:func:`pipeline_identity`) is not the spelling of ``--pretrained_model_name_or_path``:
for a local folder (or a hub id whose snapshot is in the local hub cache) it is a fingerprint of the files of
``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2`` and ``vae`` (configs and tokenizer files
in full, weight files by size and sampled bytes, safetensors headers included), so ``./pipe``, ``/abs/pipe/``, a
symlink or a copy are the same model and a folder whose encoder weights changed is not; for a hub id it is
also the commit the revision resolved to.  The encoders' dtype must be the trainer's (bf16 runs encode in bf16).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.trigflow import FluxInputs

CACHE_FORMAT = "t2i-distill-conditioning/1"
META_FILE = "cache.json"
UNCOND_FILE = "uncond.safetensors"


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


@dataclass
class CacheSpec:
    """What a cache holds; two caches (or a cache and a trainer's flags) agree when these agree."""

    pretrained_model_name_or_path: str
    revision: str | None
    resolution: int
    max_sequence_length: int
    dtype: str  # the text encoders' dtype: bfloat16 / float32
    center_crop: bool
    random_flip: bool
    seed: int
    variants: int
    num_samples: int
    shard_size: int
    dataset: dict = field(default_factory=dict)  # dataset_name, data_dir, data_files, image/caption columns
    format: str = CACHE_FORMAT
    identity: dict | None = None  # pipeline_identity() of the encoders (None: a cache written before it existed)

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "CacheSpec":
        path = Path(folder) / META_FILE
        if not path.is_file():
            raise FileNotFoundError(f"--conditioning_cache {folder} has no {META_FILE}: it is not a conditioning cache. "
                                    "Make one with python -m data.encode_conditioning (script/encode_conditioning.sh).")
        raw = json.loads(path.read_text())
        if raw.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path} has format {raw.get('format')!r}, this code reads {CACHE_FORMAT!r}; re-encode it")
        return cls(**raw)


#: The pipeline parts that make a cache's embeddings and latents (the transformer does not).
ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
_FULL_HASH_BYTES = 1 << 20  # files up to 1 MiB (configs, tokenizers) are hashed whole
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16  # larger ones (weights): 16 evenly spaced 64 KiB reads, the header included


def _file_fingerprint(path: Path, name: str, digest) -> None:
    size = path.stat().st_size
    digest.update(f"{name}:{size}:".encode())
    with path.open("rb") as f:
        if size <= _FULL_HASH_BYTES:
            digest.update(f.read())
            return
        for k in range(_SAMPLES):  # a retrained or fine-tuned encoder differs everywhere, so in every sample
            f.seek(k * (size - _SAMPLE_BYTES) // (_SAMPLES - 1))
            digest.update(f.read(_SAMPLE_BYTES))


def component_fingerprint(folder: Path) -> str:
    """A cheap content fingerprint of one pipeline component folder (a few MiB read, whatever its size)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        _file_fingerprint(path, path.relative_to(folder).as_posix(), digest)
    return digest.hexdigest()[:20]


def _hub_snapshot(repo_id: str, revision: str | None) -> tuple[Path | None, str | None]:
    """(local snapshot folder, commit) of a hub pipeline from the local hub cache, without network access."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "model_index.json", revision=revision)
    except Exception:  # an invalid repo id, no hub cache: nothing known locally
        return None, None
    if not isinstance(found, str):
        return None, None
    snapshot = Path(found).parent
    return snapshot, snapshot.name


def pipeline_identity(pretrained: str, revision: str | None) -> dict:
    """What identifies the encoders of ``pretrained`` (see module doc): ``source`` (resolved path or hub id, for
    messages), ``commit`` (hub only, when known) and ``components`` (fingerprints, when the files are local)."""
    local = Path(pretrained)
    if local.exists():
        folder, identity = local, {"source": os.path.realpath(local), "commit": None}
    else:
        folder, commit = _hub_snapshot(str(pretrained), revision)
        identity = {"source": str(pretrained), "commit": commit}
    parts = {name: component_fingerprint(folder / name) for name in ENCODER_COMPONENTS
             if folder is not None and (folder / name).is_dir()}
    identity["components"] = parts or None
    return identity


def identity_mismatch(spec: "CacheSpec", current: dict, revision: str | None) -> str | None:
    """Why the encoders of the cache ``spec`` are not those of ``current`` (a :func:`pipeline_identity` of the
    pipeline asked for with ``revision``), or None when they are the same.

    Fingerprints decide when both sides have them; else hub commits; else the resolved names and revisions
    (a hub id not in the local hub cache, or a cache written before identities were recorded).
    """
    cached = spec.identity or {"source": os.path.realpath(spec.pretrained_model_name_or_path)
                               if Path(spec.pretrained_model_name_or_path).exists() else spec.pretrained_model_name_or_path}
    if cached.get("components") and current.get("components"):
        differ = sorted(k for k in set(cached["components"]) | set(current["components"])
                        if cached["components"].get(k) != current["components"].get(k))
        return f"other {'/'.join(differ)} files" if differ else None
    if cached.get("commit") and current.get("commit"):
        return None if cached["commit"] == current["commit"] else f"commit {cached['commit']}"
    if cached["source"] == current["source"] and spec.revision == revision:
        return None
    return f"{cached['source']!r} at revision {spec.revision}"


def write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` then rename: a file of the final name is always complete."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def save_shard(path: Path, tensors: dict[str, torch.Tensor], bad_reasons: dict[int, str]) -> None:
    metadata = {"bad_reasons": json.dumps({str(k): v for k, v in bad_reasons.items()})}
    write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata))


def shard_is_complete(path: Path, expected_rows: int) -> bool:
    """A finished shard: the file opens and holds ``expected_rows`` samples (writes are atomic anyway)."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.get_slice("index").get_shape()[0] == expected_rows
    except Exception:  # missing, truncated by something else than us, unreadable
        return False


class ConditioningCacheDataset(torch.utils.data.Dataset):
    """Map-style view of a cache, shaped like :class:`data.dataset.Text2ImageDataset` for the trainer.

    ``dataset[i]`` is ``{"latents", "prompt_embeds", "pooled", "index"}`` of variant ``epoch mod V`` or, for
    a sample that was unreadable when encoded, ``{"index": i, "bad_reason": ...}``.
    """

    def __init__(self, folder: str | os.PathLike, open_shards: int = 4):
        self.folder = Path(folder)
        self.spec = CacheSpec.read(self.folder)
        missing = [k for k in range(self.spec.num_shards) if not (self.folder / shard_name(k)).is_file()]
        if missing:
            raise FileNotFoundError(f"--conditioning_cache {folder} is incomplete: {len(missing)} of "
                                    f"{self.spec.num_shards} shards missing (first {shard_name(missing[0])}). Re-run "
                                    "the same encode command: it skips the finished shards.")
        self.epoch = 0
        self._open: OrderedDict[int, tuple] = OrderedDict()
        self._max_open = open_shards

    def __len__(self) -> int:
        return self.spec.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def variant(self) -> int:
        return self.epoch % self.spec.variants

    def _shard(self, k: int) -> tuple:
        if k not in self._open:
            handle = safe_open(str(self.folder / shard_name(k)), "pt")
            reasons = json.loads(handle.metadata().get("bad_reasons", "{}"))
            self._open[k] = (handle, handle.get_tensor("valid"), {int(i): r for i, r in reasons.items()})
            if len(self._open) > self._max_open:
                self._open.popitem(last=False)
        self._open.move_to_end(k)
        return self._open[k]

    def __getitem__(self, index: int) -> dict:
        k, row = divmod(int(index), self.spec.shard_size)
        handle, valid, reasons = self._shard(k)
        if not bool(valid[row]):
            return {"index": int(index), "bad_reason": reasons.get(int(index), "unreadable when encoded")}
        v = self.variant
        return {"index": int(index), **{name: handle.get_slice(name)[v, row] for name in
                                        ("latents", "prompt_embeds", "pooled")}}

    @property
    def collate_fn(self):
        return collate_cached

    def __getstate__(self):  # DataLoader workers reopen the shards themselves
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state


def collate_cached(samples: list[dict]) -> dict:
    good = [s for s in samples if "bad_reason" not in s]
    bad = [s for s in samples if "bad_reason" in s]
    out = {"indices": [s["index"] for s in good], "bad_indices": [s["index"] for s in bad],
           "bad_reasons": [s["bad_reason"] for s in bad]}
    for name in ("latents", "prompt_embeds", "pooled"):
        out[name] = torch.stack([s[name] for s in good]) if good else None
    return out


def load_uncond(folder: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    with safe_open(str(Path(folder) / UNCOND_FILE), "pt") as f:
        return f.get_tensor("prompt_embeds"), f.get_tensor("pooled")


def latent_image_ids(resolution: int, vae_scale_factor: int = 8) -> torch.Tensor:
    """RoPE ids of the packed latent grid, as FluxPipeline computes them (its own static helper)."""
    from diffusers import FluxPipeline

    side = resolution // vae_scale_factor // 2
    return FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)


class CachedConditioner:
    """Drop-in for :class:`model.flux_io.FluxConditioner` that reads a cache instead of running encoders.

    ``encode(batch)`` → (packed latents, :class:`FluxInputs`) exactly as the encoders would give them
    (embeddings cast to float32 as ``FluxConditioner.encode_prompts`` does); ``encode_prompts([" "])`` →
    the cached unconditional embedding (MeanFlow's ``setup``); any other prompt is an error, since no
    text encoder is loaded.
    """

    def __init__(self, folder: str | os.PathLike, device: torch.device | str, vae_scale_factor: int = 8):
        self.spec = CacheSpec.read(folder)
        self.device = torch.device(device)
        embeds, pooled = load_uncond(folder)
        self._uncond = (embeds.float().to(self.device), pooled.float().to(self.device))
        self.txt_ids = torch.zeros(self.spec.max_sequence_length, 3, device=self.device)
        self.img_ids = latent_image_ids(self.spec.resolution, vae_scale_factor).to(self.device)

    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if list(captions) != [" "]:
            raise ValueError("a conditioning cache holds only its dataset's captions and \" \"; other prompts need "
                             "the text encoders (train without --conditioning_cache)")
        return self._uncond[0], self._uncond[1], self.txt_ids

    def encode(self, batch: dict) -> tuple[torch.Tensor, FluxInputs]:
        d = self.device
        return batch["latents"].to(d).float(), FluxInputs(batch["prompt_embeds"].to(d).float(),
                                                          batch["pooled"].to(d).float(), self.txt_ids, self.img_ids)


def check_cache_matches_args(spec: CacheSpec, args, text_dtype: torch.dtype) -> None:
    """One-line error when the cache was encoded with other flags, other encoders or another encoder dtype than
    the trainer's (``text_dtype``: the precision the trainer's text encoders would run in)."""
    wanted = {"resolution": args.resolution, "max_sequence_length": args.max_sequence_length,
              "center_crop": args.center_crop, "random_flip": args.random_flip}
    if spec.random_flip or not spec.center_crop or "," in str(spec.dataset.get("caption_column", "")):
        wanted["seed"] = args.seed  # random crops/flips/caption choices are seeded by (seed, epoch, index)
    for name, value in wanted.items():
        if getattr(spec, name) != value:
            raise ValueError(f"--conditioning_cache was encoded with {name}={getattr(spec, name)!r} but this run has "
                             f"--{name} {value!r}; re-encode the cache with the run's flags or change the flag")
    other = identity_mismatch(spec, pipeline_identity(str(args.pretrained_model_name_or_path), args.revision),
                              args.revision)
    if other is not None:
        raise ValueError(f"--conditioning_cache was encoded by {spec.pretrained_model_name_or_path!r} ({other}) but "
                         f"this run's --pretrained_model_name_or_path {args.pretrained_model_name_or_path!r} has "
                         "different text encoders/VAE; re-encode the cache with this pipeline (python -m "
                         "data.encode_conditioning) or pass the pipeline it was encoded with")
    dtype = str(text_dtype).removeprefix("torch.")
    if spec.dtype != dtype:
        raise ValueError(f"--conditioning_cache was encoded with the text encoders in {spec.dtype} but this run's "
                         f"precision encodes in {dtype} (--mixed_precision / the DeepSpeed config); re-encode with "
                         f"--dtype {dtype}, or train in the cache's precision")


def spec_differences(old: CacheSpec, new: CacheSpec) -> list[str]:
    """Fields in which two caches' settings differ, the encoders compared by identity rather than by name."""
    names = [k for k in vars(new) if k not in ("pretrained_model_name_or_path", "revision", "identity")]
    differ = [k for k in names if getattr(old, k) != getattr(new, k)]
    if identity_mismatch(old, pipeline_identity(new.pretrained_model_name_or_path, new.revision), new.revision):
        differ.insert(0, "pretrained_model_name_or_path")
    return differ


def open_conditioning_cache(args, text_dtype: torch.dtype) -> ConditioningCacheDataset:
    """The trainer's ``--conditioning_cache``: the dataset view, checked against the run's flags and precision."""
    dataset = ConditioningCacheDataset(args.conditioning_cache)
    check_cache_matches_args(dataset.spec, args, text_dtype)
    return dataset
