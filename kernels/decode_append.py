"""A decode step's cache writes in one launch: the new token's key and value into a static KV
cache at ``slot``, and optionally its pre-RoPE key into the pooled-K cache's current-block
buffer at ``slot % block`` and the cache's length set to ``slot + 1`` (docs/design.md §2).

A transformers ``StaticCache`` layer's ``update`` runs five launches for one token (an
``arange`` and an ``add`` for the position, the length's ``add_``, two ``index_copy_``), and
the pooled-K cache's buffer a sixth; in a replayed decode graph each costs a node (~2-3 us on
an H100) beside kernels of tens of microseconds. Here one program per (sequence, KV head)
copies its three rows; the first also stores the new length (a store, not an add: the other
programs read the slot, never the length, so no program can see it changed).

Layout: ``k``, ``v``, ``k_pre`` ``[B, H, 1, D]`` (any strides with a unit last stride); the
caches ``[B, H, S, D]``; ``buf`` ``[B, H, block, D]``; ``slot`` and ``length`` one-element
integer device tensors (``slot`` read, ``length`` written). On CPU (or ``backend="torch"``)
the same writes run as torch ops (:func:`decode_append_ref`).
"""
from .kernel_utils import check_backend, tl, triton, use_triton


@triton.jit
def _decode_append_kernel(KN, VN, PN, KC, VC, BUF, SLOT, LEN, H, block,
                          s_knb, s_knh, s_vnb, s_vnh, s_pnb, s_pnh,
                          s_kcb, s_kch, s_kct, s_vcb, s_vch, s_vct, s_bb, s_bh, s_bt,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BUF: tl.constexpr, HAS_LEN: tl.constexpr):
    pid = tl.program_id(0)  # b * H + h
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    slot = tl.load(SLOT).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m = d < D
    k = tl.load(KN + b * s_knb + h * s_knh + d, mask=m)
    tl.store(KC + b * s_kcb + h * s_kch + slot * s_kct + d, k.to(KC.dtype.element_ty), mask=m)
    v = tl.load(VN + b * s_vnb + h * s_vnh + d, mask=m)
    tl.store(VC + b * s_vcb + h * s_vch + slot * s_vct + d, v.to(VC.dtype.element_ty), mask=m)
    if HAS_BUF:
        p = tl.load(PN + b * s_pnb + h * s_pnh + d, mask=m)
        tl.store(BUF + b * s_bb + h * s_bh + (slot % block) * s_bt + d, p.to(BUF.dtype.element_ty), mask=m)
    if HAS_LEN:
        if pid == 0:
            tl.store(LEN, (slot + 1).to(LEN.dtype.element_ty))


def decode_append_ref(keys, values, k, v, slot, length=None, buf=None, k_pre=None):
    """The torch ops :func:`decode_append` stands for (what ``StaticLayer.update`` and the
    pooled-K buffer's write do for one token)."""
    pos = slot.reshape(1).long()
    keys.index_copy_(2, pos, k.to(keys.dtype))
    values.index_copy_(2, pos, v.to(values.dtype))
    if buf is not None:
        buf.index_copy_(2, pos % buf.shape[2], k_pre.to(buf.dtype))
    if length is not None:
        length.copy_((pos + 1).reshape(length.shape))


def _check(keys, values, k, v, slot, length, buf, k_pre):
    if (k_pre is None) != (buf is None):
        raise ValueError("buf and k_pre go together: give both or neither")
    if keys.dim() != 4 or values.shape != keys.shape:
        raise ValueError(f"keys and values must be [B, H, S, D] of one shape, got {tuple(keys.shape)} and "
                         f"{tuple(values.shape)}")
    B, H, _, D = keys.shape
    for name, t in (("k", k), ("v", v)) + ((("k_pre", k_pre),) if buf is not None else ()):
        if t is None or tuple(t.shape) != (B, H, 1, D):
            raise ValueError(f"{name} must be [B, H, 1, D] = {(B, H, 1, D)}, got "
                             f"{None if t is None else tuple(t.shape)}")
    if buf is not None and (buf.dim() != 4 or tuple(buf.shape[:2]) != (B, H) or buf.shape[3] != D):
        raise ValueError(f"buf must be [B, H, block, D] with B, H, D = {B, H, D}, got {tuple(buf.shape)}")
    for name, t in (("slot", slot), ("length", length)):
        if t is not None and (t.numel() != 1 or t.dtype.is_floating_point or t.device != keys.device):
            raise ValueError(f"{name} must be a one-element integer tensor on {keys.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")


def decode_append(keys, values, k, v, slot, length=None, buf=None, k_pre=None, backend="auto"):
    """Write one decode token into a static KV cache (and the pooled-K buffer) in one launch.

    Args:
        keys, values: the layer's cache ``[B, H, S, D]``, written at slot ``slot``.
        k, v: the new token's key (after RoPE) and value ``[B, H, 1, D]``.
        slot: one-element integer device tensor, the token's slot (``< S``; not checked on
            the device: the caller owns it).
        length: optional one-element integer tensor set to ``slot + 1`` (the cache's length).
        buf, k_pre: optional current-block buffer ``[B, H, block, D]`` and the token's pre-RoPE
            key ``[B, H, 1, D]``, written at row ``slot % block``.
        backend: ``"auto"`` (Triton on CUDA), ``"triton"`` or ``"torch"``.
    """
    check_backend(backend)
    _check(keys, values, k, v, slot, length, buf, k_pre)
    if not use_triton(backend, keys, "decode_append"):
        decode_append_ref(keys, values, k, v, slot, length, buf, k_pre)
        return
    B, H, _, D = keys.shape
    if any(t.stride(-1) != 1 for t in (keys, values) + ((buf,) if buf is not None else ())):
        raise ValueError("decode_append: the caches' last dimension must be contiguous")
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    has_buf = buf is not None
    if has_buf and k_pre.stride(-1) != 1:
        k_pre = k_pre.contiguous()
    pn, bf = (k_pre, buf) if has_buf else (k, keys)  # placeholders when absent (never read)
    ln = length if length is not None else slot
    _decode_append_kernel[(B * H,)](
        k, v, pn, keys, values, bf, slot, ln, H, bf.shape[2],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), pn.stride(0), pn.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        bf.stride(0), bf.stride(1), bf.stride(2),
        D=D, BLOCK_D=triton.next_power_of_2(D), HAS_BUF=has_buf, HAS_LEN=length is not None, num_warps=1)
