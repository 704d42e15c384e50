"""Distilling the decode gate: the bounded-memory target (sampled query rows), the KL loss over
the candidate blocks, and the decode loss inside ``gate_loss`` in distill mode."""
import torch

from seer_attn.modeling_seer.decode_gate import (decode_block_target, decode_candidates, decode_distill_loss,
                                                 decode_forced_blocks, sample_decode_rows)


def test_target_is_the_group_mean_of_block_attention_mass(gen):
    """Against a materialised causal softmax per query head (GQA 3, a left-padded row)."""
    B, HQ, H, T, D = 2, 6, 2, 200, 8
    q = torch.randn(B, HQ, T, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    rows = torch.tensor([[70, 199, -1], [150, 64, 130]])
    bounds = torch.tensor([[0, T], [40, T]])
    got = decode_block_target(q.float(), k.float(), rows, 0.3, 64, bounds=bounds)
    assert got.shape == (B, H, 3, 4)
    for b in range(B):
        for r, t in enumerate(rows[b].tolist()):
            for h in range(H):
                if t < 0:
                    assert torch.equal(got[b, h, r], torch.zeros(4))
                    continue
                keys = torch.arange(int(bounds[b, 0]), t + 1)
                want = torch.zeros(4, dtype=torch.float64)
                for hq in range(3 * h, 3 * h + 3):
                    p = torch.softmax(0.3 * k[b, h, keys] @ q[b, hq, t], 0)
                    want.index_add_(0, keys // 64, p / 3)
                torch.testing.assert_close(got[b, h, r], want.float(), atol=1e-6, rtol=1e-5)


def test_loss_is_zero_at_the_target_and_positive_elsewhere(gen):
    B, H, R, NB = 2, 2, 3, 6
    target = torch.rand(B, H, R, NB, generator=gen)
    rows = torch.tensor([[64 * 5 + 3, 64 * 3, 10], [64 * 4, 64 * 5 + 60, 64 * 2]])
    first = torch.tensor([0, 2])
    cand = decode_candidates(rows, first, NB, 64)
    assert cand[0, 0, 0].tolist() == [True] * 5 + [False]
    assert cand[1, 0, 0].tolist() == [False, False, True, True, False, False]
    assert not cand[0, 0, 2].any()  # row 10: its block is the first, nothing before it
    t = target * cand
    exact = torch.log((t / t.sum(-1, keepdim=True).clamp_min(1e-30)).clamp_min(1e-30))
    assert decode_distill_loss(exact, target, cand).abs() < 1e-5
    other = torch.randn(B, H, R, NB, generator=gen)
    assert decode_distill_loss(other, target, cand) > 1e-2
    # non-candidate entries of the scores change nothing
    noisy = torch.where(cand.expand_as(other), other, torch.randn(B, H, R, NB, generator=gen) * 100)
    torch.testing.assert_close(decode_distill_loss(noisy, target, cand), decode_distill_loss(other, target, cand))


def test_sampled_rows():
    torch.manual_seed(0)
    bounds = torch.tensor([[0, 1000], [300, 1000], [0, 60], [0, 100]])
    rows = sample_decode_rows(bounds, 16, 64)
    assert rows.shape == (4, 16)
    assert ((rows[0] >= 250) & (rows[0] < 1000)).all() and len(set(rows[0].tolist())) == 16
    assert ((rows[1] >= 475) & (rows[1] < 1000)).all()  # a quarter in, and a full real block before it
    assert (rows[2] == -1).all()  # too short to leave a full block before any row's own
    assert ((rows[3] >= 64) & (rows[3] < 100)).all()  # rows of block 1 choose among block 0
    assert (rows[0].diff() > 0).all()  # stratified: one per share, in order
    torch.manual_seed(0)
    assert torch.equal(sample_decode_rows(bounds, 16, 64), rows)


def _ids(T, B=1, seed=0):
    return torch.randint(0, 96, (B, T), generator=torch.Generator().manual_seed(seed))


def test_distill_mode_adds_the_decode_loss_and_trains_only_gates(tiny):
    x = _ids(600, B=2)
    plain = tiny(seed=0, seer_mode="distill").train()
    with_dec = tiny(seed=0, seer_mode="distill", seer_decode_gate=True).train()
    with_dec.load_state_dict(plain.state_dict(), strict=False)  # the same base and prefill gates
    torch.manual_seed(1)
    loss = with_dec(x).gate_loss
    with torch.no_grad():
        base = plain(x).gate_loss
    assert loss.item() > base.item() + 1e-6  # the decode KL terms are added
    loss.backward()
    for name, p in with_dec.named_parameters():
        if ".attn_gate." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_decode_loss_falls_when_training(tiny):
    """A few Adam steps on the decode gates alone lower the loss on held-out text (the prefill
    gates are frozen, so their part of ``gate_loss`` is a constant)."""
    m = tiny(seed=0, seer_mode="distill", seer_decode_gate=True, seer_decode_distill_rows=32,
             initializer_range=0.3).train()
    for name, p in m.named_parameters():
        p.requires_grad_(".decode_gate." in name)
    x, held = _ids(384, B=2, seed=1), _ids(384, B=2, seed=2)

    @torch.no_grad()
    def held_loss():
        torch.manual_seed(5)  # the same sampled rows
        return m(held).gate_loss.item()

    before = held_loss()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(10):
        opt.zero_grad()
        m(x).gate_loss.backward()
        opt.step()
    after = held_loss()
    assert after < before - 0.1 * abs(before), (before, after)


def test_forced_blocks_are_the_sink_and_the_local_ones():
    rows = torch.tensor([[64 * 5 + 3, 64 * 2], [64 * 4, 64 * 5 + 60]])
    first = torch.tensor([0, 2])
    got = decode_forced_blocks(rows, first, 6, 64, keep_local=2)
    assert got[0, 0, 0].tolist() == [True, False, False, True, True, False]  # sink 0, local 3-4 (own block 5)
    assert got[0, 0, 1].tolist() == [True, True, False, False, False, False]  # own block 2: local 0-1
    assert got[1, 0, 1].tolist() == [False, False, True, True, True, False]  # sink 2 (left padding before it)
    assert decode_forced_blocks(rows, first, 6, 64)[0, 0, 0].tolist() == [True] + [False] * 5


def test_free_loss_leaves_the_forced_blocks_out(tiny):
    """``seer_decode_distill_forced=False``: the decode loss is the KL over the candidates without the
    sink, whatever the gate scores the sink (and differs from the default loss)."""
    x = _ids(600, B=2)
    losses = {}
    for forced in (True, False):
        m = tiny(seed=0, seer_mode="distill", seer_decode_gate=True, seer_decode_distill_forced=forced).train()
        captured = []
        real = decode_distill_loss

        def spy(scores, target, cand):
            captured.append((scores.detach(), target, cand))
            return real(scores, target, cand)

        import seer_attn.modeling_seer.seer_layer as layer
        old, layer.decode_distill_loss = layer.decode_distill_loss, spy
        try:
            torch.manual_seed(1)
            losses[forced] = m(x).gate_loss.item()
        finally:
            layer.decode_distill_loss = old
        scores, target, cand = captured[0]
        sink_in = cand[..., 0].any().item()
        assert sink_in == forced, forced  # block 0 is every row's sink here (no padding)
        if not forced:  # the sink's score changes nothing
            bumped = scores.clone()
            bumped[..., 0] += 50.0
            torch.testing.assert_close(real(bumped, target, cand), real(scores, target, cand))
    assert abs(losses[True] - losses[False]) > 1e-4
