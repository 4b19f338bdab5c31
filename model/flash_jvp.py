"""Optional flash-JVP attention kernel for the student's JVP on CUDA (PyPI ``jvp-flash-attention``).

No fused attention kernel in PyTorch has a forward-mode derivative.  ``jvp-flash-attention`` (Triton,
install with ``pip install -e .[gpu]``) computes the primal O and the tangent dO in one flash-style pass
with O(N) memory.  ``--jvp_attention auto`` (the default) uses it when all of these hold, and the exact
chunked path of :mod:`model.attention` otherwise:

* the attention runs on a CUDA device and the package imports (it needs Triton);
* head dimension in {16, 32, 64, 128, 256}, q/k/v of one head dimension, N even and ≥ 32
  (the kernel's own limits), no attention mask;
* dtype float16, bfloat16 or float32.

``--jvp_attention flash`` forces it and fails with a one-line reason when it cannot be used.
The kernel is called through its dual-tensor entry point ``JVPAttn.fwd_dual``, which its authors give as
the way to use it under ``torch.func.jvp``.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INSTALL_HINT = "install the optional kernel with `pip install jvp-flash-attention` (or `pip install -e .[gpu]`)"


@functools.lru_cache(maxsize=1)
def load_flash_jvp_kernel() -> Callable | None:
    """``JVPAttn.fwd_dual`` from ``jvp_flash_attention``, or None when the package (or Triton) is missing."""
    try:
        from jvp_flash_attention.jvp_attention import JVPAttn
    except Exception:  # ImportError, or Triton failing to initialise on this machine
        return None
    return JVPAttn.fwd_dual


def flash_jvp_unusable_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernel cannot take these [B, H, N, D] tensors (None: it can)."""
    if q.device.type != "cuda":
        return f"the attention runs on {q.device.type}, the kernel is CUDA-only"
    if load_flash_jvp_kernel() is None:
        return f"jvp_flash_attention does not import; {INSTALL_HINT}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not one of float16, bfloat16, float32"
    if not (q.shape[-1] == k.shape[-1] == v.shape[-1]) or q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dimension {q.shape[-1]} is not one of {SUPPORTED_HEAD_DIMS}"
    n = q.shape[-2]
    if n != k.shape[-2] or n % 2 or n < 32:
        return f"sequence length {n} must be even, at least 32 and the same for queries and keys"
    return None


def resolve_jvp_attention(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The implementation to run: ``auto`` → ``flash`` when usable, else ``chunked``; others unchanged."""
    if impl == "auto":
        return "flash" if flash_jvp_unusable_reason(q, k, v) is None else "chunked"
    if impl == "flash":
        reason = flash_jvp_unusable_reason(q, k, v)
        if reason is not None:
            raise RuntimeError(f"--jvp_attention flash cannot be used: {reason}. Use --jvp_attention auto "
                               "(flash where possible, the exact chunked path elsewhere).")
    return impl


def flash_jvp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d)V on [B, H, N, D] through the flash-JVP kernel (tangent computed in the same pass)."""
    kernel = load_flash_jvp_kernel()
    return kernel(q.contiguous(), k.contiguous(), v.contiguous())
