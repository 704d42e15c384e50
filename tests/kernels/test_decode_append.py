"""kernels/decode_append.py: one decode token's cache writes in one launch (the Triton kernel: the
interpreter on CPU, compiled on a GPU) against the torch ops it stands for (``decode_append_ref``:
what a transformers StaticLayer's update and the pooled-K buffer's write do); strided inputs,
head dims that are not a power of two, slots at block edges, the optional buffer and length;
one-line errors for bad shapes."""
import pytest
import torch

from seer_attn.kernels.decode_append import decode_append, decode_append_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, H, S, D, dtype, seed, strided=False, block=64):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, S, D, generator=gen).to(dtype)
    values = torch.randn(B, H, S, D, generator=gen).to(dtype)
    buf = torch.randn(B, H, block, D, generator=gen).to(dtype)
    if strided:  # as a projection's view: [B, 1, H, D] transposed
        k, v, kp = (torch.randn(B, 1, H, D, generator=gen).to(dtype).transpose(1, 2) for _ in range(3))
    else:
        k, v, kp = (torch.randn(B, H, 1, D, generator=gen).to(dtype) for _ in range(3))
    return [t.to(DEV) for t in (keys, values, k, v, buf, kp)]


@pytest.mark.parametrize("B, H, S, D, slot, strided", [
    (1, 1, 64, 16, 0, False), (2, 3, 130, 32, 63, True), (3, 2, 200, 80, 64, True), (2, 8, 256, 128, 255, False),
    (1, 4, 1000, 64, 129, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_buf, with_len", [(True, True), (False, True), (True, False), (False, False)])
def test_kernel_equals_the_torch_ops(B, H, S, D, slot, strided, dtype, with_buf, with_len):
    keys, values, k, v, buf, kp = _inputs(B, H, S, D, dtype, seed=B * 1000 + D + slot, strided=strided)
    s = torch.tensor([slot], device=DEV)
    got = [t.clone() for t in (keys, values, buf)]
    want = [t.clone() for t in (keys, values, buf)]
    len_got = torch.tensor(slot, device=DEV)  # a StaticLayer's cumulative_length: 0-dim long
    len_want = len_got.clone()
    decode_append(got[0], got[1], k, v, s, len_got if with_len else None, got[2] if with_buf else None,
                  kp if with_buf else None, backend="triton")
    decode_append_ref(want[0], want[1], k, v, s, len_want if with_len else None, want[2] if with_buf else None,
                      kp if with_buf else None)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert torch.equal(got[0][:, :, slot], k[:, :, 0])  # the token itself, not just agreement
    assert torch.equal(got[1][:, :, slot], v[:, :, 0])
    if with_buf:
        assert torch.equal(got[2][:, :, slot % 64], kp[:, :, 0])
    else:
        assert torch.equal(got[2], buf)
    assert int(len_got) == (slot + 1 if with_len else slot)
    other = torch.ones(S, dtype=torch.bool)
    other[slot] = False
    assert torch.equal(got[0][:, :, other], keys[:, :, other])  # nothing else written


def test_reference_equals_a_static_layer_update():
    """The reference is what transformers' StaticLayer.update does for one token."""
    from transformers.cache_utils import StaticLayer
    B, H, S, D = 2, 2, 70, 16
    keys, values, k, v, _, _ = _inputs(B, H, S, D, torch.float32, seed=0)
    layer = StaticLayer(max_cache_len=S)
    layer.lazy_initialization(k, v)
    layer.keys.copy_(keys)
    layer.values.copy_(values)
    layer.cumulative_length.fill_(65)
    kk, vv, ln = keys.clone(), values.clone(), torch.tensor(65, device=DEV)
    layer.update(k, v)
    decode_append_ref(kk, vv, k, v, torch.tensor([65], device=DEV), ln)
    assert torch.equal(layer.keys, kk) and torch.equal(layer.values, vv)
    assert int(layer.cumulative_length) == int(ln) == 66


def test_bad_inputs_raise_one_line_errors():
    keys, values, k, v, buf, kp = _inputs(2, 2, 70, 16, torch.float32, seed=1)
    s = torch.tensor([3], device=DEV)
    with pytest.raises(ValueError, match=r"k must be \[B, H, 1, D\]"):
        decode_append(keys, values, k[:1], v, s)
    with pytest.raises(ValueError, match="buf and k_pre go together"):
        decode_append(keys, values, k, v, s, buf=buf)
    with pytest.raises(ValueError, match="slot must be a one-element integer tensor"):
        decode_append(keys, values, k, v, torch.tensor([3.0], device=DEV))
    with pytest.raises(ValueError, match="backend must be"):
        decode_append(keys, values, k, v, s, backend="cuda")
