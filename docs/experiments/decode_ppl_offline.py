"""Decode perplexity with the oracle selector in one forward per window: which allocation of a
decode step's blocks could reach issue 15's 1.02x at 10% (docs/experiments/decode_quality.md).

Teacher-forced sparse decode is a prefill in which every row t past the prefix attends only to
the blocks its own decode step would read: row t's keys and values at a layer come from its
hidden state, which came from its sparse attention in the layers below, exactly as in the step
loop. So ``eval.decode_quality``'s protocol (tokens ``[0, L/2)`` a dense prefill, tokens
``L/2 .. L-1`` scored as decode steps) is one forward of the stock model with an attention
function (registered with transformers' ``AttentionInterface``) that, for rows past the prefix,
computes the row's softmax over its causal keys, sums it per 64-token block and over the query
heads of each KV head's group (the ``oracle`` selector's scores, ``decode_oracle_scores``), keeps
the blocks a setting selects and attends over those alone. On the CPU that is ~1 minute per
8192-token window instead of ~4096 step forwards; the ``--check`` option compares it with the
step loop (``decode_perplexity`` with ``share=S,oracle``) on a short case.

Settings: ``share=S`` the decode rule (the sink, the current block and the best others,
``max(2, ceil(S * n))`` of a row's n blocks per KV head), optionally followed by
``,pool`` (the same total per layer, the best (head, block) pairs of the row across its KV heads,
each head's sink and current block forced), ``,dense=N`` (the first N layers read every block),
``,late=F`` (a per-layer share ramp: layer i reads ``S * (1 + F * (2 i / (n_layers - 1) - 1))``,
the same mean, F > 0 gives late layers more), ``,local=N``, ``,gate`` (rank the blocks by the
decode gate's logits instead of the oracle's mass: the model's own decode-step scores, the
current query's projection against each full block's pooled pre-RoPE keys, needs ``--gates``
with decode gates), ``,meanpool`` (rank them by the training-free MoBA-like score: the row's
post-RoPE query against each block's mean post-RoPE key, softmaxed per query head and averaged
over the KV head's group; session 32; since session 36 the softmax spans the row's full blocks
only, as a decode step sees them), ``,mix=A`` (the mixture ``(1 - A) log p_gate + A log p_meanpool``
of the two, each a distribution over the row's full blocks, as ``seer_meanpool_prior`` mixes the prefill
gate; needs ``--gates``), ``,keys=f8`` / ``,keys=i8`` (session 45: the gate's block keys rounded to float8
e4m3 or int8 at one scale per key, what an 8-bit pooled-K cache would score; with ``,gate``).
``budget=N`` keeps ``N // 64`` blocks per row (the model's ``budget`` rule) instead of a share.
``dense`` is dense decode. The kept
share is averaged over rows, layers and KV heads (a dense layer counts 1), as
``seer_decode_density``.

    python docs/experiments/decode_ppl_offline.py --windows 4 --settings dense share=0.1 share=0.1,pool \\
        --out results/decode/cpu_oracle_alloc_8k.json
    python docs/experiments/decode_ppl_offline.py --gates GATES --check 0.25 --settings dense share=0.1,gate
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F

from seer_attn.eval.perplexity import load_documents, make_windows
from seer_attn.kernels.decode_select import EIGHT_BIT_KEYS, eight_bit_keys
from seer_attn.modeling_seer.conversion import default_model_path, load_tokenizer
from seer_attn.modeling_seer.selection import block_pool, prepare_decode_selection, select_decode_blocks
from seer_attn.training.results import write_envelope

BS = 64
NAME = "seer_offline_decode"
STATE = {}


SELECTORS = ("gate", "meanpool", "quest")


def parse_setting(text):
    """``dense`` -> None; ``share=S|budget=N[,pool][,dense=N][,late=F][,local=N][,SELECTOR]`` -> dict, SELECTOR one
    of gate, meanpool, quest, mix=A, qmix=A."""
    if text == "dense":
        return None
    usage = "share=S|budget=N[,pool][,dense=N][,late=F][,local=N][,gate|,meanpool|,quest|,mix=A|,qmix=A][,keys=f8|i8]"
    head, *extras = text.split(",")
    key, _, val = head.partition("=")
    if key not in ("share", "budget"):
        raise SystemExit(f"bad setting {text!r}: expected dense or {usage}")
    out = {"share": float(val) if key == "share" else None, "budget": int(val) if key == "budget" else None,
           "pool": False, "dense": 0, "late": 0.0, "local": 0, "gate": False, "meanpool": False, "quest": False,
           "mix": None, "qmix": None, "keys": None}
    for e in extras:
        k, _, v = e.partition("=")
        if k in ("pool",) + SELECTORS and not v:
            out[k] = True
        elif k in ("dense", "local"):
            out[k] = int(v)
        elif k in ("late", "mix", "qmix"):
            out[k] = float(v)
        elif k == "keys" and v in EIGHT_BIT_KEYS:
            out[k] = v
        else:
            raise SystemExit(f"bad part {e!r} of setting {text!r}")
    if sum([out["gate"], out["meanpool"], out["quest"], out["mix"] is not None, out["qmix"] is not None]) > 1:
        raise SystemExit(f"bad setting {text!r}: ,gate ,meanpool ,quest ,mix=A and ,qmix=A are selectors; give one")
    for k in ("mix", "qmix"):
        if out[k] is not None and not 0 <= out[k] <= 1:
            raise SystemExit(f"bad setting {text!r}: {k}={out[k]} is not in [0, 1]")
    if out["budget"] is not None and (out["pool"] or out["late"]):
        raise SystemExit(f"bad setting {text!r}: ,pool and ,late apply to a share, not a budget")
    return out


def layer_rule(spec, layer, n_layers):
    """The rule layer ``layer`` selects by, ``{"share": S}`` or ``{"budget": N}`` (the keyword of
    ``prepare_decode_selection`` / ``select_decode_blocks``), or None: dense."""
    if layer < spec["dense"]:
        return None
    if spec["budget"] is not None:
        return {"budget": spec["budget"]}
    sparse = n_layers - spec["dense"]
    i = layer - spec["dense"]
    ramp = 2 * i / (sparse - 1) - 1 if sparse > 1 else 0.0
    return {"share": min(1.0, max(0.0, spec["share"] * (1 + spec["late"] * ramp)))}


def select_blocks(mass, rows, rule, pool, local):
    """Bool ``[B, H, C, NB]``: the blocks each row's decode step reads by ``rule`` (:func:`layer_rule`),
    from the oracle mass
    ``[B, H, C, NB]`` of rows ``rows`` (long ``[C]``, consecutive), and the kept share per (row,
    head). The model's share or budget rule (``prepare_decode_selection`` / ``select_decode_blocks``) per
    group of rows sharing a current block; ``pool`` ranks the group's (head, block) pairs across
    the KV heads instead, keeping the same total."""
    B, H, C, NB = mass.shape
    keep = torch.zeros(B, H, C, NB, dtype=torch.bool)
    (method,) = rule
    cur = rows // BS
    for c in cur.unique().tolist():
        at = (cur == c).nonzero().flatten()
        s = mass[:, :, at, :c + 1].permute(0, 2, 1, 3).reshape(-1, H, c + 1)  # [B * R, H, c + 1]
        first = torch.zeros(s.shape[0], dtype=torch.long)
        prep = prepare_decode_selection(first, c, method, block_size=BS, num_heads=H, keep_local=local, **rule)
        if pool:
            total = int(prep["cnt"][0].sum())
            idx = torch.topk((s + prep["bias"]).flatten(1), total, dim=-1).indices
            got = torch.zeros(s.shape[0], H * (c + 1), dtype=torch.bool).scatter_(1, idx, True).view_as(s)
        else:
            idx, cnt = select_decode_blocks(s, first, method, block_size=BS, prepared=prep, **rule)
            first_cnt = torch.arange(idx.shape[-1]) < cnt[..., None]
            got = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, first_cnt)
        keep[:, :, at, :c + 1] = got.view(B, len(at), H, c + 1).permute(0, 2, 1, 3)
    return keep, keep.sum(-1).double() / (cur + 1)[None, None]


def gate_keys(module, T):
    """The decode gate's block keys ``[B, H, ceil(T / 64), G]`` of a layer's T tokens, from its pre-RoPE
    k (kept by :func:`keep_pre_rope`; the gate's RoPE at each block's first token), as the pooled-K cache
    holds them. A block depends only on its own tokens, so one call per layer serves every chunk of rows."""
    gate = module.attn_gate.decode_gate
    NB = -(-T // BS)
    return gate.block_keys(block_pool(STATE["pre"][1].float(), BS, gate.k_pooling),
                           rope=STATE["rope_at"](torch.arange(NB)[None] * BS))


def rounded_keys(keys, fmt):
    """``keys`` ``[..., G]`` after a round trip through 8 bits (session 45): each key row in float8 e4m3 or int8
    at its own scale (``kernels.decode_select.eight_bit_keys``, ``fmt`` one of its ``EIGHT_BIT_KEYS``), as a
    cache holding 8-bit keys and one scale a block would score them."""
    k8, scales = eight_bit_keys(keys, fmt)
    return k8.float() * scales[..., None]


def gate_logits(module, keys, c0, c1):
    """The decode gate's logits ``[B, H, c1 - c0, NB]`` of rows ``c0 .. c1 - 1`` against ``keys`` (:func:`gate_keys`)
    of the blocks of the first ``c1`` tokens: what a decode step's ``DecodeGate.step_logits`` computes (the
    gate's RoPE at the row's position). A row's own (partial) block is scored too; the selection forces it,
    so its score is never read."""
    gate = module.attn_gate.decode_gate
    qg = gate.query(STATE["pre"][0][:, :, c0:c1].float(), rope=STATE["rope_at"](torch.arange(c0, c1)[None]))
    return gate.scores(qg, keys[:, :, :-(-c1 // BS)])


def keep_pre_rope(cls):
    """Wrap ``cls.seer_attention`` so the attention function can read the layer's pre-RoPE q and k."""
    inner = cls.seer_attention

    def seer_attention(self, q, k, v, q_pre, k_pre, *args, **kwargs):
        STATE["pre"] = (q_pre, k_pre)
        return inner(self, q, k, v, q_pre, k_pre, *args, **kwargs)

    cls.seer_attention = seer_attention


def group_log_softmax(sc, full, H):
    """Per-query-head scores ``[B, HQ, C, NB]`` softmaxed over each row's full blocks (``full`` bool ``[C, NB]``),
    averaged over the KV head's group, logged (floored at float32's smallest normal): ``[B, H, C, NB]``, 0 on the
    other blocks (the current one is forced, later ones never read)."""
    B, HQ, C, _ = sc.shape
    p = torch.softmax(sc.masked_fill(~full, float("-inf")), -1).view(B, H, HQ // H, C, -1).mean(2)
    return p.clamp_min(torch.finfo(torch.float32).tiny).log().masked_fill(~full, 0.0)


def meanpool_logits(q, kmean, full, H):
    """The MoBA-like decode score ``[B, H, C, NB]`` (log): each query head's q . (mean post-RoPE key of the block)
    softmaxed over the row's full blocks (``full`` bool ``[C, NB]``), averaged over the KV head's group; 0 on the
    other blocks (the current one is forced, later ones never read)."""
    return group_log_softmax(torch.matmul(q, kmean.transpose(-1, -2)), full, H)


def quest_logits(q, kmin, kmax, full, H):
    """The Quest-bound decode score ``[B, H, C, NB]`` (log): per query head the largest ``q . k`` a key of the
    block could give, ``relu(q) . kmax + min(q, 0) . kmin`` (per-channel min / max of its post-RoPE keys),
    softmaxed over the row's full blocks and averaged over the KV head's group as :func:`meanpool_logits`."""
    sc = torch.matmul(q.clamp_min(0), kmax.transpose(-1, -2)) + torch.matmul(q.clamp_max(0), kmin.transpose(-1, -2))
    return group_log_softmax(sc, full, H)


def offline_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Dense causal rows before the prefix; rows past it attend over their selected blocks (the
    oracle's, or the decode gate's with ``gate``)."""
    B, HQ, T, D = query.shape
    H = key.shape[1]
    g = HQ // H
    P, spec, chunk = STATE["prefix"], STATE["spec"], STATE["chunk"]
    kr, vr = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    out = torch.empty(B, HQ, T, D, dtype=query.dtype)
    out[:, :, :P] = F.scaled_dot_product_attention(query[:, :, :P], kr[:, :, :P], vr[:, :, :P], is_causal=True,
                                                   scale=scaling)
    rule = None if spec is None else layer_rule(spec, module.layer_idx, STATE["n_layers"])
    mix = None if rule is None else spec["mix"]
    qmix = None if rule is None else spec["qmix"]
    keys = gate_keys(module, T) if rule is not None and (spec["gate"] or mix is not None or qmix is not None) else None
    if keys is not None and spec["keys"] is not None:
        keys = rounded_keys(keys, spec["keys"])
    if rule is not None and (spec["meanpool"] or mix is not None):  # each block's mean post-RoPE key
        kmean = block_pool(key.float(), BS, ("avg",)).repeat_interleave(g, 1)  # as selection.meanpool_scores pools
    if rule is not None and (spec["quest"] or qmix is not None):  # each block's per-channel key min and max
        kmax = block_pool(key.float(), BS, ("max",)).repeat_interleave(g, 1)
        kmin = block_pool(key.float(), BS, ("min",)).repeat_interleave(g, 1)
    for c0 in range(P, T, chunk):
        c1 = min(T, c0 + chunk)
        rows = torch.arange(c0, c1)
        s = torch.matmul(query[:, :, c0:c1].float() * scaling, kr[:, :, :c1].float().transpose(-1, -2))
        s = s.masked_fill(torch.arange(c1)[None, :] > rows[:, None], float("-inf"))
        if rule is not None:
            NB = -(-c1 // BS)
            full = torch.arange(NB)[None, :] < (rows // BS)[:, None]  # [C, NB]: a row's full blocks
            if spec["gate"]:
                mass = gate_logits(module, keys, c0, c1)
            elif spec["quest"] or qmix is not None:
                mass = quest_logits(query[:, :, c0:c1].float() * scaling, kmin[:, :, :NB], kmax[:, :, :NB], full, H)
            elif spec["meanpool"] or mix is not None:
                mass = meanpool_logits(query[:, :, c0:c1].float() * scaling, kmean[:, :, :NB], full, H)
            else:
                p = F.pad(torch.softmax(s, -1), (0, NB * BS - c1))
                mass = p.view(B, H, g, c1 - c0, NB, BS).sum((2, 5)) / g
            a = mix if mix is not None else qmix
            if a is not None:  # the mixture (1 - a) log p_gate + a log p_free over the full blocks
                lg = gate_logits(module, keys, c0, c1).masked_fill(~full, float("-inf")).log_softmax(-1)
                mass = ((1 - a) * lg + a * mass).masked_fill(~full, 0.0)
            keep, kept = select_blocks(mass, rows, rule, spec["pool"], spec["local"])
            STATE["kept"].append(kept.mean().item())
            tok = keep.repeat_interleave(BS, -1)[..., :c1].repeat_interleave(g, 1)
            s = s.masked_fill(~tok, float("-inf"))
        elif spec is not None:
            STATE["kept"].append(1.0)
        out[:, :, c0:c1] = torch.matmul(torch.softmax(s, -1), vr[:, :, :c1].float()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def decode_ppl(model, windows, spec, batch_size, chunk):
    """PPL of the decode half of ``windows`` and the mean kept share (None: dense)."""
    L = windows[0].input_ids.shape[0]
    STATE.update(prefix=L // 2, spec=spec, chunk=chunk, n_layers=model.config.num_hidden_layers, kept=[])
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = torch.stack([w.input_ids for w in windows[i:i + batch_size]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, L // 2 - 1:L - 1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, L // 2:], reduction="none").double()
        total += nll.sum().item()
        count += nll.numel()
    kept = sum(STATE["kept"]) / len(STATE["kept"]) if STATE["kept"] else None
    return math.exp(total / count), kept


def load_model(path, gates=None):
    """The stock model (the oracle) or, with ``gates``, the Seer model in dense mode with its decode
    gates (``,gate`` settings); either way attention runs through :func:`offline_attention`."""
    import os
    from transformers import AttentionInterface, AutoModelForCausalLM
    AttentionInterface.register(NAME, offline_attention)
    if gates is None:
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32)
    else:
        from seer_attn.modeling_seer.conversion import load_seer_model
        from seer_attn.modeling_seer.seer_layer import SeerAttentionMixin, gate_structure
        if not gate_structure(gates).get("seer_decode_gate"):  # a prefill-only file: untrained decode gates
            raise SystemExit(f"--gates {gates}: no decode gates in it")
        model = load_seer_model(path, dtype=torch.float32, gates=gates)
        keep_pre_rope(SeerAttentionMixin)
        STATE["rope_at"] = model.model._gate_rope_at
    model.set_attn_implementation(NAME)
    return model.eval()


def check(path, tok, corpus, share, gates=None, length=1024, windows=2):
    """The offline PPL against the step loop (``decode_perplexity``; the oracle selector, or the
    decode gate with ``gates``) on a short case."""
    from seer_attn.eval.decode_quality import decode_perplexity
    from seer_attn.eval.settings import apply_decode
    from seer_attn.modeling_seer.conversion import load_seer_model
    wins = make_windows(load_documents(corpus), tok, length, 2)[:windows]
    seer = load_seer_model(path, dtype=torch.float32, gates=gates, seer_decode_gate=True)
    selector = "oracle" if gates is None else "gate"
    apply_decode(seer, {"seer_decode_method": "share", "seer_decode_share": share, "seer_decode_selector": selector})
    loop = decode_perplexity(seer, wins, length // 2, windows, progress=False)
    setting = f"share={share}" + ("" if gates is None else ",gate")
    off = decode_ppl(load_model(path, gates), wins, parse_setting(setting), windows, 256)
    return {"length": length, "windows": windows, "share": share, "selector": selector, "loop_ppl": loop["ppl"],
            "loop_kept": loop["decode_density"], "offline_ppl": off[0], "offline_kept": off[1]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", help="jsonl corpus (default: the bundled eval corpus)")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--windows", type=int, default=4, help="first N windows (2 per document)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=256, help="decode rows per attention chunk")
    ap.add_argument("--settings", nargs="+", default=["dense", "share=0.1"])
    ap.add_argument("--check", type=float, metavar="SHARE", help="first compare with the step loop at this share")
    ap.add_argument("--gates", help="distilled gates with decode gates (for ,gate settings and --check)")
    ap.add_argument("--out", help="also write the results as a JSON envelope here")
    args = ap.parse_args()
    specs = [(s, parse_setting(s)) for s in args.settings]
    torch.set_num_threads(2)
    path = default_model_path()
    tok = load_tokenizer(path)
    rows, checks = [], []

    def save(complete):
        if args.out:
            write_envelope(args.out, "decode_ppl_offline", rows, config=vars(args), model=path, complete=complete,
                           device="cpu", checks=checks)

    if args.check is not None:
        t0 = time.time()
        checks.append(check(path, tok, args.eval, args.check, args.gates))
        print(f"check {checks[-1]} ({time.time() - t0:.0f} s)", flush=True)
        save(False)
    if any(spec and (spec["gate"] or spec["mix"] is not None or spec["qmix"] is not None) for _, spec in specs) \
            and not args.gates:
        raise SystemExit("a ,gate ,mix=A or ,qmix=A setting needs --gates (distilled gates with decode gates)")
    model = load_model(path, args.gates)
    wins = make_windows(load_documents(args.eval), tok, args.length, 2)[:args.windows]
    dense = None
    for text, spec in specs:
        t0 = time.time()
        ppl, kept = decode_ppl(model, wins, spec, args.batch_size, args.chunk)
        dense = ppl if spec is None else dense
        rows.append({"setting": text, "ppl": ppl, "ratio": ppl / dense if dense else None,
                     "kept_share": kept, "windows": len(wins), "seconds": time.time() - t0})
        save(False)
        ratio = f"{ppl / dense:.4f}x" if dense else "-"
        kept_text = "1" if kept is None else f"{kept:.4f}"
        print(f"{text}: ppl {ppl:.4f} {ratio} kept {kept_text} ({time.time() - t0:.0f} s)", flush=True)
    save(True)


if __name__ == "__main__":
    main()
