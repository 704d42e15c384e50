"""Decode gates trained offline on the CPU: how much attention mass each variant keeps against
the oracle at the same share (issue 15; docs/experiments/decode_quality.md).

The decode gate's loss depends on the frozen model's queries and keys only, so its inputs can
be captured once: one distill-mode forward per sequence with
``SeerAttentionMixin._decode_distill_loss`` replaced by a recorder that keeps, per layer, the
sampled rows' pre-RoPE queries, the blocks' pooled pre-RoPE keys, the gate's RoPE tables and
the target (the rows' true attention mass per block, summed over the query group). Decode
gates are then trained on those tensors alone (Adam, lr 1e-3, cosine, as the trainer), one
per layer, for each variant, and scored on held-out sequences of the eval corpus by **kept
mass**: at a share s a decode step at row t keeps ``max(2, ceil(s * n))`` of its n blocks
(the sink, the current block and the best-scoring others, as ``select_decode_blocks``), and
the kept mass is the target's mass on them. The oracle ranks by the target itself, streaming
by recency. Lost mass (1 - kept) is what sparse decode takes from each step's attention.

    python docs/experiments/decode_gate_offline.py --train /work/shared/data/corpora/train.jsonl \\
        --eval /work/shared/data/corpora/eval.jsonl --out seer_outputs/decode_gate_offline

Writes ``decode_gate_offline.json`` (an envelope: variants x shares, overall and per layer).
"""
import argparse
import math
import os
import time

import torch

from seer_attn.modeling_seer import seer_layer
from seer_attn.modeling_seer.decode_gate import DecodeGate, decode_block_target, decode_candidates, \
    decode_distill_loss, decode_forced_blocks
from seer_attn.modeling_seer.selection import block_pool

#: variant -> (gate hidden size, target sharpening exponent, loss, key granularity in tokens)
VARIANTS = {
    "kl": (128, 1.0, "kl", 64),  # the trainer's loss
    "kl_g256": (256, 1.0, "kl", 64),  # twice the gate width
    "kl_sharp2": (128, 2.0, "kl", 64),  # target squared and renormalised: the heavy blocks weigh more
    "kl_kept": (128, 1.0, "kl+kept", 64),  # plus the mass the share's top set misses (soft top-k)
    "kl_sub16": (128, 1.0, "kl", 16),  # keys pooled per 16 tokens, a block scored by logsumexp of its four
    "kl_nosink": (128, 1.0, "kl-sink", 64),  # the KL over the candidates without the sink block (always kept)
}
SUB = 16


def capture(model, seqs, rows):
    """Per layer: list of dicts (one per sequence) of the decode-distillation inputs."""
    store = {}

    def recorder(self, q, k, q_pre, k_pre, ctx):
        bs = self.config.seer_block_size
        r = ctx.decode_rows.to(q.device)
        B = q.shape[0]
        gate = getattr(self.attn_gate, seer_layer.DECODE_GATE)
        qr = q_pre.gather(2, r.clamp_min(0)[:, None, :, None].expand(B, q_pre.shape[1], -1, q_pre.shape[3]))
        qpost = q.gather(2, r.clamp_min(0)[:, None, :, None].expand(B, q.shape[1], -1, q.shape[3]))
        store.setdefault(self.layer_idx, []).append(dict(
            q=qr.float().clone(), pooled=block_pool(k_pre, bs, gate.k_pooling).float(),
            q_post=qpost.float() * self.scaling, k_bounds=block_pool(k, bs, ("max", "min")).float(),
            pooled_sub=block_pool(k_pre, SUB, gate.k_pooling).float(),
            target=decode_block_target(q, k, r, self.scaling, bs), rows=r.clone(),
            q_rope=tuple(t.clone() for t in ctx.decode_rope), k_rope=tuple(t.clone() for t in ctx.gate_rope)))
        return q.new_zeros(())

    real = seer_layer.SeerAttentionMixin._decode_distill_loss
    seer_layer.SeerAttentionMixin._decode_distill_loss = recorder
    model.config.seer_decode_distill_rows = rows
    try:
        with torch.no_grad():
            for i, ids in enumerate(seqs):
                torch.manual_seed(1000 + i)  # the sampled rows
                model(input_ids=ids[None])
    finally:
        seer_layer.SeerAttentionMixin._decode_distill_loss = real
    return store


def _cat(items, key):
    if isinstance(items[0][key], tuple):
        return tuple(torch.cat([it[key][j] for it in items]) for j in range(len(items[0][key])))
    return torch.cat([it[key] for it in items])


def _scores(gate, batch, sub=64):
    qg = gate.query(batch["q"], rope=batch["q_rope"])
    if sub == 64:
        return gate.scores(qg, gate.block_keys(batch["pooled"], rope=batch["k_rope"]))
    s = gate.scores(qg, gate.block_keys(batch["pooled_sub"], rope=batch["k_rope_sub"]))  # [B, H, R, NB * 64 / sub]
    return s.unflatten(-1, (-1, 64 // sub)).logsumexp(-1)


def quest_scores(q_post, k_bounds):
    """Quest-like training-free decode scores ``[B, H, R, NB]``: per query head, the upper bound
    of a block's logits from its post-RoPE keys' channel-wise max and min (sum over channels of
    the larger of q_d * max_d and q_d * min_d), softmaxed over the blocks and summed over the
    group's heads (the oracle's aggregation); log of that."""
    B, HQ, R, D = q_post.shape
    H = k_bounds.shape[1]
    kmax, kmin = k_bounds[..., :D], k_bounds[..., D:]  # [B, H, NB, D]
    g = HQ // H
    q = q_post.view(B, H, g, R, 1, D)
    ub = torch.maximum(q * kmax[:, :, None, None], q * kmin[:, :, None, None]).sum(-1)  # [B, H, g, R, NB]
    return ub, g


def _quest_group(ub, rows, bs):
    """Softmax of the bounds over each row's causal blocks, summed over the group: log scores."""
    NB = ub.shape[-1]
    cur = (rows // bs)[:, None, None, :, None]
    ub = ub.masked_fill(torch.arange(NB) > cur, float("-inf"))
    return torch.softmax(ub, dim=-1).sum(2).clamp_min(1e-30).log()


def _kept_loss(scores, target, cand, share):
    """The target mass outside a soft top set of the share's size (sigmoid around the k-th score)."""
    s = scores.masked_fill(~cand, -1e9)
    n = cand.sum(-1, keepdim=True).clamp_min(1)
    k = torch.ceil(share * n.float()).clamp_min(1).long()
    kth = torch.sort(s.detach(), dim=-1, descending=True).values.gather(-1, k - 1)
    soft = torch.sigmoid((s - kth) * 4.0) * cand
    t = target * cand
    t = t / t.sum(-1, keepdim=True).clamp_min(1e-30)
    return ((1 - soft) * t).sum(-1).mean()


def train_gate(data, cfg, variant, steps, batch, seed):
    """One layer's decode gate trained on its captured ``data`` (RoPE tables at the variant's width)."""
    hidden, sharp, loss, sub = VARIANTS[variant]
    torch.manual_seed(seed)
    gate = DecodeGate(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, hidden,
                      tuple(cfg.seer_k_pooling), cfg.seer_gate_rope)
    opt = torch.optim.Adam(gate.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    bs = cfg.seer_block_size
    for _ in range(steps):
        pick = torch.randperm(len(data), generator=gen)[:batch].tolist()
        b = {key: _cat([data[i] for i in pick], key) for key in data[0]}
        scores = _scores(gate, b, sub)
        target = b["target"] ** sharp if sharp != 1.0 else b["target"]
        first = torch.zeros(len(pick), dtype=torch.long)
        cand = decode_candidates(b["rows"], first, scores.shape[-1], bs)
        if loss == "kl-sink":  # the step keeps the sink whatever its score: rank the others only
            cand = cand & ~decode_forced_blocks(b["rows"], first, scores.shape[-1], bs)
        out = decode_distill_loss(scores, target, cand)
        if loss == "kl+kept":
            out = out + 5.0 * _kept_loss(scores, b["target"], cand.expand_as(scores), 0.1)
        opt.zero_grad()
        out.backward()
        opt.step()
        sched.step()
    return gate


def rope_tables(model, hidden):
    """``fn(positions [B, n]) -> (cos, sin)`` of the family's rotary embedding at ``hidden`` channels
    (the gate's RoPE at another gate width)."""
    from seer_attn.modeling_seer.seer_layer import gate_rotary_config
    cfg = gate_rotary_config(model.config)
    cfg.head_dim = hidden
    rotary = type(model.model.gate_rotary_emb)(config=cfg)
    return lambda pos: rotary(torch.empty(0, dtype=torch.float32), pos)


def with_rope(data, rope_at, bs):
    """``data`` items with the gate's RoPE of ``rope_at`` at their rows, block starts and
    sub-block starts (no padding)."""
    out = []
    for d in data:
        nb, ns, B = d["pooled"].shape[2], d["pooled_sub"].shape[2], d["rows"].shape[0]
        out.append(dict(d, q_rope=rope_at(d["rows"].clamp_min(0)),
                        k_rope=rope_at((torch.arange(nb) * bs)[None].expand(B, nb)),
                        k_rope_sub=rope_at((torch.arange(ns) * SUB)[None].expand(B, ns))))
    return out


@torch.no_grad()
def kept_mass(scores, target, rows, share, bs):
    """Mean and per-row kept mass at ``share`` (see module docstring): scores, target ``[B, H, R, NB]``."""
    B, H, R, NB = target.shape
    cur = (rows // bs)[:, None, :, None]  # [B, 1, R, 1]
    j = torch.arange(NB)
    n = (cur + 1).float()
    cnt = torch.minimum(torch.ceil(share * n).clamp_min(2), n)  # the sink and the current block count
    forced = (j == 0) | (j == cur)
    s = scores.float().masked_fill(j > cur, float("-inf")).masked_fill(forced, float("inf"))
    order = s.argsort(-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(NB).expand_as(order).contiguous())
    keep = rank < cnt
    return (target * keep).sum(-1)  # [B, H, R]


@torch.no_grad()
def mass_keep(scores, rows, p, bs):
    """Selection by predicted mass: softmax the scores over each row's causal blocks and keep
    the best-scoring blocks until their softmaxed scores sum to ``p`` (the sink and the
    current block first, counted in the sum; at least those two). Returns the keep mask
    ``[B, H, R, NB]`` and each row's kept share of its blocks ``[B, H, R]``."""
    B, H, R, NB = scores.shape
    cur = (rows // bs)[:, None, :, None]
    j = torch.arange(NB)
    forced = (j == 0) | (j == cur)
    prob = torch.softmax(scores.float().masked_fill(j > cur, float("-inf")), dim=-1)
    key = prob.masked_fill(forced, 2.0)  # forced blocks first
    order = key.argsort(-1, descending=True)
    sorted_prob = prob.gather(-1, order)
    before = sorted_prob.cumsum(-1) - sorted_prob  # the mass of the better-ranked blocks
    keep_sorted = ((before < p) | (j < 2)) & (j <= cur)  # here j is the rank; a row keeps at most its n
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted) & (j <= cur)
    return keep, keep.sum(-1).float() / (cur[..., 0] + 1).float()


def mass_rows(name, score_of, targets, rows_of, shares, bs):
    """Kept mass of the predicted-mass selection, its ``p`` solved (bisection, one ``p`` for all
    layers) so that the mean kept share over layers and rows is what the fixed share reaches
    at each of ``shares`` (its ``max(2, ceil(s * n))`` blocks of n)."""
    layers = sorted(targets)
    n = (rows_of[layers[0]] // bs + 1).float()

    def run(p):
        kept, share = [], []
        for layer in layers:
            keep, sh = mass_keep(score_of[layer], rows_of[layer], p, bs)
            km = (targets[layer] * keep).sum(-1)
            kept.append(km.mean().item())
            share.append(sh.mean().item())
        return sum(kept) / len(kept), sum(share) / len(share), kept, share

    out = []
    for share_knob in shares:
        target_share = (torch.minimum(torch.ceil(share_knob * n).clamp_min(2), n) / n).mean().item()
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            if run(mid)[1] < target_share:
                lo = mid
            else:
                hi = mid
        kept, share, per_layer, per_share = run(hi)
        out.append(dict(selector=f"{name}:mass", share=share_knob, achieved_share=share, p=hi, kept=kept,
                        per_layer=per_layer, per_layer_share=per_share))
        print(f"share {share_knob:g} {name + ':mass':>14}: kept mass {kept:.4f} at share {share:.4f} "
              f"(p {hi:.4f})", flush=True)
    return out


def save_gates(base, gates, path):
    """``base``'s tensors and metadata with each layer's decode gate replaced by ``gates[layer]`` (in the
    base's dtype)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(base, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    for layer, gate in gates.items():
        for name in ("q_weight", "k_weight"):
            key = f"model.layers.{layer}.self_attn.attn_gate.decode_gate.{name}"
            if key not in tensors:
                raise SystemExit(f"--save-gates {base}: no {key} in it (a file with decode gates is needed)")
            tensors[key] = getattr(gate, name).detach().to(tensors[key].dtype).contiguous()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(tensors, path, metadata=meta)
    print(f"wrote {path}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--train", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--train-seqs", type=int, default=32)
    ap.add_argument("--eval-seqs", type=int, default=8)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--retrieval-mix", type=float, default=0.25)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--mass", action="store_true",
                    help="also select by predicted mass (oracle and each gate), p solved per share")
    ap.add_argument("--out", default="seer_outputs/decode_gate_offline")
    ap.add_argument("--save-gates", metavar="GATES",
                    help="also write, per variant with 64-token keys and the base width, GATES (a distilled gates "
                         "file with decode gates) with its decode gates replaced by the variant's: "
                         "OUT/gates_VARIANT.safetensors, for decode_ppl_offline.py --gates")
    args = ap.parse_args(argv)
    from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer
    from seer_attn.training.data import load_documents, pack_documents
    from seer_attn.training.results import write_envelope

    torch.set_num_threads(os.cpu_count() or 1)
    tok = load_tokenizer(args.model)
    model = load_seer_model(args.model, dtype=torch.float32, seer_mode="distill", seer_decode_gate=True).eval()
    cfg = model.config
    train = pack_documents(load_documents(args.train), tok, args.seq_len, seed=0)
    if args.retrieval_mix:
        from seer_attn.training.retrieval_data import mix_retrieval
        train = mix_retrieval(train, args.retrieval_mix, seed=0, tokenizer=tok)
    evals = pack_documents(load_documents(args.eval), tok, args.seq_len, seed=0)
    t0 = time.time()
    tr = capture(model, [torch.tensor(train[i]["input_ids"]) for i in range(args.train_seqs if args.variants else 0)],
                 args.rows)
    ev = capture(model, [torch.tensor(evals[i]["input_ids"]) for i in range(args.eval_seqs)], args.rows)
    print(f"captured {args.train_seqs} + {args.eval_seqs} sequences of {args.seq_len} in {time.time() - t0:.0f} s",
          flush=True)
    bs = cfg.seer_block_size
    layers = sorted(ev)
    rows = []
    ev_all = {layer: {key: _cat(ev[layer], key) for key in ev[layer][0]} for layer in layers}  # once per layer
    if args.mass:
        targets = {layer: ev_all[layer]["target"] for layer in layers}
        rows_of = {layer: ev_all[layer]["rows"] for layer in layers}
        rows += mass_rows("oracle", {layer: targets[layer].clamp_min(1e-30).log() for layer in layers},
                          targets, rows_of, args.shares, bs)
    for share in args.shares:
        for name in ["oracle", "streaming", "quest", "quest_max"]:
            per_layer = []
            for layer in layers:
                e = ev_all[layer]
                NB = e["target"].shape[-1]
                if name == "oracle":
                    sc = e["target"]
                elif name == "streaming":
                    sc = torch.arange(NB, dtype=torch.float32).expand_as(e["target"])
                else:  # quest: softmaxed bounds summed over the group; quest_max: the group's largest bound
                    ub, _ = quest_scores(e["q_post"], e["k_bounds"])
                    sc = _quest_group(ub, e["rows"], bs) if name == "quest" else ub.max(2).values
                per_layer.append(kept_mass(sc, e["target"], e["rows"], share, bs).mean().item())
            rows.append(dict(selector=name, share=share, kept=sum(per_layer) / len(per_layer), per_layer=per_layer))
            print(f"share {share:g} {name:>10}: kept mass {rows[-1]['kept']:.4f}", flush=True)
    for variant in args.variants:
        t1 = time.time()
        hidden, sub = VARIANTS[variant][0], VARIANTS[variant][3]
        rope_at = rope_tables(model, hidden) if hidden != cfg.seer_gate_hidden_size or sub != bs else None
        gates = {}
        for layer in layers:
            data = with_rope(tr[layer], rope_at, bs) if rope_at else tr[layer]
            gates[layer] = train_gate(data, cfg, variant, args.steps, args.batch, seed=layer)
        gate_scores = {}  # each layer's gate scores of the eval rows: the same at every share
        for layer in layers:
            e = ev_all[layer]
            if rope_at:
                items = with_rope(ev[layer], rope_at, bs)
                e = {key: _cat(items, key) for key in items[0]}
            with torch.no_grad():
                gate_scores[layer] = _scores(gates[layer], e, sub)
        for share in args.shares:
            per_layer = []
            for layer in layers:
                e = ev_all[layer]
                per_layer.append(kept_mass(gate_scores[layer], e["target"], e["rows"], share, bs).mean().item())
            rows.append(dict(selector=f"gate:{variant}", share=share, kept=sum(per_layer) / len(per_layer),
                             per_layer=per_layer, train_seconds=time.time() - t1))
            print(f"share {share:g} {variant:>10}: kept mass {rows[-1]['kept']:.4f} ({time.time() - t1:.0f} s)",
                  flush=True)
        if args.mass:
            rows += mass_rows(f"gate:{variant}", gate_scores, targets, rows_of, args.shares, bs)
        if args.save_gates and not rope_at:
            save_gates(args.save_gates, gates, os.path.join(args.out, f"gates_{variant}.safetensors"))
    os.makedirs(args.out, exist_ok=True)
    write_envelope(os.path.join(args.out, "decode_gate_offline.json"), "decode_gate_offline", rows,
                   config=vars(args), model=args.model or "embedded SmolLM2-135M", device="cpu", complete=True)
    print("\n| selector | " + " | ".join(f"kept mass at {s:g}" for s in args.shares) + " |")
    print("|---|" + "---|" * len(args.shares))
    for name in dict.fromkeys(r["selector"] for r in rows):
        vals = [f"{r['kept']:.4f}" for r in rows if r["selector"] == name]
        print(f"| {name} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main()
