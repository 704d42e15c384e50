"""Shared helpers of the attention kernels: the optional Triton import, input validation,
output allocation and backend dispatch.

This module is copied flat into saved model folders (remote code), so it imports only
torch and the standard library outside ``try`` blocks.
"""
import math
import os

import torch

try:  # Triton is optional: CPU installs run the torch references.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised in the fresh-environment test
    HAS_TRITON = False

    class _TritonStub:
        """Lets the kernel modules define their ``@triton.jit`` functions without Triton."""

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

    class _TlStub:
        constexpr = None

    triton = _TritonStub()
    tl = _TlStub()

try:  # Hopper tensor descriptors (Triton >= 3.4); the kernels' pointer loads serve without them
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

#: The only block size the kernels implement (SeerAttention's 64x64 blocks).
SUPPORTED_BLOCK_SIZES = (64,)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest accepted ``sm_scale``. Typical scales are 1/sqrt(D) (0.09-0.25); below this bound
#: scale * log2(e) * |q.k| stays finite in fp32 for any |q.k| < 1e34, far beyond what fp16 /
#: bf16 activations reach, while 1e38 (say) makes the fp32 logits inf and the output NaN.
MAX_SM_SCALE = 1e4

#: Tests set this to True: launchers then fill outputs with NaN before the kernel runs,
#: so an element the kernel forgets to write shows up as NaN instead of stale memory.
POISON_OUTPUTS = False


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tma_capable(*tensors) -> bool:
    """Whether tiles of ``tensors`` can load through tensor descriptors (Hopper's TMA): Triton
    has them, a Hopper-or-newer GPU or the interpreter, 16-bit tensors whose base and outer
    strides are 16-byte aligned and whose last dim is contiguous (TMA's rules)."""
    if TensorDescriptor is None:
        return False
    t0 = tensors[0]
    if t0.is_cuda and torch.cuda.get_device_capability(t0.device)[0] < 9:
        return False
    return all(t.dtype in (torch.float16, torch.bfloat16) and t.data_ptr() % 16 == 0 and t.stride(-1) == 1
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in tensors)


@triton.jit
def desc_rows(desc, b, h, n0, N: tl.constexpr, D: tl.constexpr):
    """Rows ``n0 .. n0 + N - 1`` of head ``h`` of batch ``b`` through a ``[B, H, T, D]``
    tensor descriptor built with block ``[1, 1, N, D]`` (rows past T read as zeros)."""
    return tl.reshape(desc.load([b, h, n0, 0]), (N, D))


def check_backend(backend) -> None:
    """A public op's ``backend`` argument: ``"auto"``, ``"triton"`` or ``"torch"``."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def use_triton(backend, t, what) -> bool:
    """Whether the public op ``what`` runs its Triton kernel on tensor ``t`` (``backend``
    checked by :func:`check_backend`): ``"triton"``, or ``"auto"`` on a CUDA tensor with
    Triton installed; ``"triton"`` without the package or off CUDA (outside the interpreter) is
    an error."""
    use = backend == "triton" or (backend == "auto" and HAS_TRITON and t.is_cuda)
    if use and not HAS_TRITON:
        raise RuntimeError(f"{what}: backend='triton' needs the triton package (pip install triton)")
    if use and not (t.is_cuda or interpreting()):
        raise ValueError(f"{what}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {t.device}")
    return use


def new_output(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def num_blocks(seq_len: int, block_size: int) -> int:
    return (seq_len + block_size - 1) // block_size


def check_attention_inputs(q, k, v, sm_scale, block_size, *, causal=True, allow_fp32=True):
    """Validate q/k/v in the transformers layout ``[B, H, T, D]``, ``sm_scale`` (None or a real
    number in (0, :data:`MAX_SM_SCALE`]), ``block_size`` and ``causal`` (a bool); return
    (B, HQ, H, T, D, scale).

    K and V may have fewer heads than Q (GQA) when ``HQ % H == 0``. Raises TypeError or
    ValueError naming the offending argument and value.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 [B, H, T, D], got shape {tuple(t.shape)}")
    check_qkv_types(q, k, v, allow_fp32)
    B, HQ, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch, length or head_dim "
            "(these kernels compute prefill attention, where queries and keys have the same length)"
        )
    H = k.shape[1]
    check_heads_and_sizes(HQ, H, T, D, block_size)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    return B, HQ, H, T, D, resolve_sm_scale(sm_scale, D)


def check_qkv_types(q, k, v, allow_fp32=True) -> None:
    """The dtype, device and k/v shape checks every attention entry point shares (prefill
    and decode): q in a supported dtype, k and v in q's dtype and on q's device, k and v of
    one shape."""
    dtypes = SUPPORTED_DTYPES if allow_fp32 else SUPPORTED_DTYPES[:2]
    if q.dtype not in dtypes:
        raise TypeError(f"q.dtype must be one of {[str(d) for d in dtypes]}, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape, got k={tuple(k.shape)}, v={tuple(v.shape)}")


def check_heads_and_sizes(HQ, H, T, D, block_size) -> None:
    """GQA head counts, a non-empty key length ``T``, a supported head_dim and block size."""
    if H == 0 or HQ % H != 0:
        raise ValueError(f"the number of query heads ({HQ}) must be a multiple of the number of key/value heads ({H})")
    if T == 0:
        raise ValueError("sequence length T must be >= 1, got 0")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {D} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size {block_size!r} is not supported; supported: {SUPPORTED_BLOCK_SIZES}")


def resolve_sm_scale(sm_scale, D) -> float:
    """``sm_scale`` checked (a real number in (0, :data:`MAX_SM_SCALE`]), or 1/sqrt(D) for None."""
    if sm_scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)) or not 0 < sm_scale <= MAX_SM_SCALE:
        raise ValueError(f"sm_scale must be a positive finite number <= {MAX_SM_SCALE:g} (larger scales overflow "
                         f"the fp32 logits), got {sm_scale!r}")
    return float(sm_scale)


def check_block_mask(block_mask, B, HQ, NB, device):
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask must be a torch.Tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must have dtype torch.bool, got {block_mask.dtype}")
    if tuple(block_mask.shape) != (B, HQ, NB, NB):
        raise ValueError(
            f"block_mask must have shape [B, HQ, NB, NB] = {(B, HQ, NB, NB)}, got {tuple(block_mask.shape)}"
        )
    if block_mask.device != device:
        raise ValueError(f"block_mask is on {block_mask.device}, q is on {device}")


def check_seq_bounds(seq_bounds, B, T, device):
    """``seq_bounds``: int tensor [B, 2] of (start, end): tokens start <= t < end are real.

    Left padding (as ``generate`` produces) is start = T - length, end = T; right padding is
    start = 0, end = length. Returns an int32 contiguous tensor or None.
    """
    if seq_bounds is None:
        return None
    if not isinstance(seq_bounds, torch.Tensor):
        raise TypeError(f"seq_bounds must be a torch.Tensor of shape [B, 2], got {type(seq_bounds).__name__}")
    if seq_bounds.dtype.is_floating_point or seq_bounds.dtype == torch.bool:
        raise TypeError(f"seq_bounds must be an integer tensor, got {seq_bounds.dtype}")
    if tuple(seq_bounds.shape) != (B, 2):
        raise ValueError(f"seq_bounds must have shape [B, 2] = {(B, 2)}, got {tuple(seq_bounds.shape)}")
    sb = seq_bounds.to(device=device, dtype=torch.int32).contiguous()
    start, end = sb[:, 0], sb[:, 1]
    if bool(((start < 0) | (end > T) | (start > end)).any()):
        raise ValueError(f"seq_bounds must satisfy 0 <= start <= end <= T={T}, got {seq_bounds.tolist()}")
    return sb


def check_window(window, causal=True):
    """``window``: None (full causal attention) or a positive int of tokens: key j is visible to
    query i iff ``j <= i`` and ``i - j < window`` (transformers' sliding window). Returns it."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be None or a positive int (tokens), got {window!r}")
    if not causal:
        raise ValueError(f"window={window} needs causal=True (a sliding window is causal)")
    return int(window)
