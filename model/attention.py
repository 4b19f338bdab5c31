"""JVP-safe attention for the FLUX student.

No fused scaled-dot-product-attention kernel in PyTorch (flash, memory-efficient, cuDNN, the CPU
flash kernel) defines a forward-mode derivative, so ``torch.func.jvp`` through stock FLUX fails with
"Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu that does not support it".

:class:`JVPFluxAttnProcessor` is FLUX's joint attention processor with the attention call made
tangent-aware: ordinary forwards (teacher, the student's grad pass, sampling) keep the fast fused
path; only when a forward-AD tangent is present does it switch to a JVP-capable implementation:

* ``"chunked"``: :class:`_AttentionWithJVP`, an autograd.Function whose primal is the fused
  SDPA and whose tangent is computed in query chunks (O(chunk·N) memory instead of O(N²)):

      O = P V,  P = softmax(S),  S = Q Kᵀ / √d
      dS = (dQ Kᵀ + Q dKᵀ) / √d
      dO = (P ⊙ dS) V − rowsum(P ⊙ dS) ⊙ O + P dV

* ``"math"``: PyTorch's composite MATH SDPA backend (materialises the full score tensor and its
  tangent; the reference implementation).

* ``"flash"``: the optional Triton flash-JVP kernel on CUDA (:mod:`model.flash_jvp`); ``"auto"`` (default)
  picks it when it is installed and usable, ``"chunked"`` otherwise, and always ``"chunked"`` when the
  primal also needs gradients (the merged sCM pass, training/scm.py): its fused SDPA primal keeps SDPA's
  own backward there (saved, not recomputed), so the gradients are those of an ordinary forward.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections
from torch import nn
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.flash_jvp import flash_jvp_attention, resolve_jvp_attention

JVP_IMPLEMENTATIONS = ("auto", "chunked", "math", "flash")
CPU_TANGENT_CHUNK = 128
_TANGENTS_DETACHED = contextvars.ContextVar("jvp_attention_tangents_detached", default=False)


@contextlib.contextmanager
def detached_attention_tangents() -> Iterator[None]:
    """Within: the chunked attention tangent is computed without autograd, for callers that detach the JVP.

    With gradients on (the merged sCM pass) the tangent would otherwise record a graph whose every query
    chunk saves its N-wide probabilities, kept alive by the tangents downstream: O(layers·N²) memory for a
    gradient nobody takes (sCM's θ⁻ = stopgrad θ).
    """
    token = _TANGENTS_DETACHED.set(True)
    try:
        yield
    finally:
        _TANGENTS_DETACHED.reset(token)


def has_forward_tangent(tensor: torch.Tensor) -> bool:
    """True inside ``torch.func.jvp`` (functorch-wrapped tensor) or for an ``autograd.forward_ad`` dual.

    While torch.compile traces, the answer is False without looking: dynamo cannot trace the functorch
    query (it would break the graph at every attention layer), and a compiled module that is called
    inside ``torch.func.jvp`` or with forward-AD duals is not traced at all — dynamo runs it eagerly,
    where this check is real.  So a compiled student's ordinary forwards are one graph with the fused
    kernel, and its JVPs run eagerly through the tangent-aware path (tests/test_compat_compile.py).
    """
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        return True
    return forward_ad.unpack_dual(tensor).tangent is not None


def _records_gradients(tensor: torch.Tensor) -> bool:
    """Whether autograd records this tensor's history, looking through torch.func.jvp's wrappers (which
    report ``requires_grad=False`` whatever the tensor they wrap)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return torch.is_grad_enabled() and tensor.requires_grad


def _sdpa_bhnd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def default_tangent_chunk(device: torch.device | str) -> int:
    """Queries per chunk of :func:`chunked_attention_tangent` on ``device``.

    CPU: 128, whose chunk×N score blocks stay in cache; ``python -m benchmarks.tangent_chunk`` (4 heads × 64,
    batch 2, 1 thread) measured 0.63× the time of 1024-query chunks at 1056 tokens and 0.66× at 4608 (64 ties
    with 128; 256 and more are slower).  CUDA: 1024 as before (not measured here), few large kernels where
    launches, not cache, limit small chunks.
    """
    return 1024 if torch.device(device).type == "cuda" else CPU_TANGENT_CHUNK


def chunked_attention_tangent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                              dq: torch.Tensor | None, dk: torch.Tensor | None, dv: torch.Tensor | None,
                              chunk_size: int = 1024) -> torch.Tensor:
    """dO of O = softmax(QKᵀ/√d)V on [B, H, N, D], in query chunks (O(chunk·N) extra memory).

    With Q̂ = Q/√d folded in once (no pass over the N² scores for the scale):
        P = softmax(Q̂ Kᵀ),   dS = [Q̂, dQ̂] [dK, K]ᵀ     (one product with inner dimension 2D)
        dO = (P ⊙ dS) V − rowsum(P ⊙ dS) ⊙ O + P dV
    The N²-sized work per chunk is two products, the softmax, one in-place multiply and one row sum.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    compute = torch.promote_types(q.dtype, torch.float32)
    k_, v_ = k.to(compute), v.to(compute)
    dv_ = torch.zeros_like(v_) if dv is None else dv.to(compute)
    dk_ = torch.zeros_like(k_) if dk is None else dk.to(compute)
    keys = dk_ if dq is None else torch.cat([dk_, k_], dim=-1)
    keys_t, k_t = keys.transpose(-1, -2), k_.transpose(-1, -2)
    d_out = torch.empty(out.shape, dtype=compute, device=out.device)
    for start in range(0, q.shape[-2], chunk_size):
        sl = slice(start, start + chunk_size)
        q_c = q[..., sl, :].to(compute) * scale
        probs = torch.softmax(q_c @ k_t, dim=-1)
        lhs = q_c if dq is None else torch.cat([q_c, dq[..., sl, :].to(compute) * scale], dim=-1)
        p_ds = (lhs @ keys_t).mul_(probs)  # P ⊙ dS
        d_c = p_ds @ v_ + probs @ dv_
        d_out[..., sl, :] = d_c.sub_(p_ds.sum(-1, keepdim=True) * out[..., sl, :].to(compute))
    return d_out.to(out.dtype)


class _AttentionWithJVP(torch.autograd.Function):
    """softmax(QKᵀ/√d)V on [B, H, N, D] tensors with a chunked forward-mode derivative.

    When an input requires grad (the merged sCM pass: forward-mode AD with gradients on, where the
    student's only forward is this one), the fused SDPA primal is recorded with autograd on aliases of
    the inputs, and :meth:`backward` runs that kernel's own backward from what it saved (O, logsumexp):
    the same gradients, bit for bit, as an ordinary forward, and no second attention forward.
    """

    chunk_size: int | None = None  # None: default_tangent_chunk(device); tests set small values

    @staticmethod
    def forward(q, k, v):
        # dynamo traces this Function (torch.func.jvp of a compiled student) but not the hand-over below.
        if torch.compiler.is_compiling() or not any(t.requires_grad for t in (q, k, v)):
            return _sdpa_bhnd(q, k, v)
        with torch.enable_grad():  # autograd.Function.forward runs under no_grad
            leaves = tuple(t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
            out = _sdpa_bhnd(*leaves)
        result = out.detach()  # shares O's storage and version counter: in-place edits are caught
        result._sdpa_graph = (leaves, out)  # handed to setup_context (forward has no ctx)
        return result

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v = inputs
        ctx.save_for_forward(q, k, v, output)
        ctx.sdpa_graph = None if torch.compiler.is_compiling() else output.__dict__.pop("_sdpa_graph", None)
        if ctx.sdpa_graph is None:
            ctx.save_for_backward(q, k, v)

    @staticmethod
    def jvp(ctx, dq, dk, dv):
        q, k, v, out = ctx.saved_tensors
        chunk = _AttentionWithJVP.chunk_size or default_tangent_chunk(q.device)
        with torch.no_grad() if _TANGENTS_DETACHED.get() else contextlib.nullcontext():
            return chunked_attention_tangent(q, k, v, out, dq, dk, dv, chunk)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.sdpa_graph is not None:
            return _AttentionWithJVP._saved_graph_backward(ctx, grad_out)
        q, k, v = ctx.saved_tensors  # built without gradients: recompute the primal
        with torch.enable_grad():
            q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
            out = _sdpa_bhnd(q_, k_, v_)
        return torch.autograd.grad(out, (q_, k_, v_), grad_out)

    @staticmethod
    def _saved_graph_backward(ctx, grad_out):
        """dQ, dK, dV by the fused kernel's own backward, from the O and logsumexp its forward saved."""
        if not ctx.sdpa_graph:
            raise RuntimeError("a second backward through the JVP-safe attention of a merged pass: the first one "
                               "freed its saved tensors (retain_graph is not supported here)")
        (leaves, out), ctx.sdpa_graph = ctx.sdpa_graph, ()  # one backward: free the saved tensors now
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return tuple(next(grads) if leaf.requires_grad else None for leaf in leaves)


def jvp_safe_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Attention on diffusers' [B, N, H, D] layout that supports forward-mode AD.

    ``auto``: the flash-JVP kernel on CUDA when installed (:mod:`model.flash_jvp`) for a JVP without
    gradients, else ``chunked``.
    """
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if impl == "auto" and any(_records_gradients(t) for t in (q, k, v)):
        # A JVP with gradients on (the merged sCM pass) also trains through this primal: the chunked path keeps
        # the fused SDPA and its own backward, so the gradients are an ordinary forward's.
        impl = "chunked"
    if impl in ("auto", "flash"):
        impl = resolve_jvp_attention(impl, q, k, v)
    if impl == "flash":
        out = flash_jvp_attention(q, k, v)
    elif impl == "chunked":
        out = _AttentionWithJVP.apply(q, k, v)
    elif impl == "math":
        with sdpa_kernel(SDPBackend.MATH):
            out = _sdpa_bhnd(q, k, v)
    else:
        raise ValueError(f"unknown JVP attention implementation {impl!r}; choose from {JVP_IMPLEMENTATIONS}")
    return out.transpose(1, 2)


class JVPFluxAttnProcessor(FluxAttnProcessor):
    """FLUX joint/single-stream attention that stays differentiable in forward mode (see module doc)."""

    def __init__(self, jvp_impl: str = "auto"):
        super().__init__()
        if jvp_impl not in JVP_IMPLEMENTATIONS:
            raise ValueError(f"unknown JVP attention implementation {jvp_impl!r}; choose from {JVP_IMPLEMENTATIONS}")
        self.jvp_impl = jvp_impl

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        # Projections, QK-norm and RoPE exactly as diffusers' FluxAttnProcessor (same helpers).
        query, key, value, enc_query, enc_key, enc_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        heads = lambda t: t.unflatten(-1, (-1, attn.head_dim))
        query, key, value = attn.norm_q(heads(query)), attn.norm_k(heads(key)), heads(value)
        if attn.added_kv_proj_dim is not None:
            query = torch.cat([attn.norm_added_q(heads(enc_query)), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(enc_key)), key], dim=1)
            value = torch.cat([heads(enc_value), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if attention_mask is None and any(has_forward_tangent(t) for t in (query, key, value)):
            hidden_states = jvp_safe_attention(query, key, value, self.jvp_impl)
        else:
            hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                                  backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        n_text = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [n_text, hidden_states.shape[1] - n_text], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


def set_jvp_attention(transformer: nn.Module, jvp_impl: str = "auto") -> None:
    """Install :class:`JVPFluxAttnProcessor` on every FLUX attention layer of ``transformer``."""
    count = 0
    for module in transformer.modules():
        if hasattr(module, "set_processor") and hasattr(module, "head_dim"):
            module.set_processor(JVPFluxAttnProcessor(jvp_impl))
            count += 1
    if count == 0:
        raise ValueError("no FLUX attention layers found to equip with JVP-safe attention")
