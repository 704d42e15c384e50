"""Issue 17 screen: a gate that scores only the blocks its selection decides.

The keep rules of the issue's protocol (diagonal, sink, one local block) keep those blocks
whatever the gate says, yet the paper's loss spends most of each row's target mass on them: the
sink and the diagonal hold the largest max-pooled entries. This screen leaves the forced blocks
out of the gate's softmax, in the distillation loss (the target renormalised over the other
blocks) and, to match, before every selection (the keep rules add them back). Patched in this
process only; the package is unchanged unless the screen shows a gain.

    python docs/experiments/free_blocks.py {train,infer} GATE_QUALITY_ARGS...

``train``: distillation and selection both leave the forced blocks out; ``infer``: only the
selection does (given gates trained with the paper's loss). The remaining arguments go to
gate_quality.py (for instance session 29's screen: ``--cpu --variants plain --steps 80 --seq-len
2048 --eval-length 4096 --densities 0.1 --phases ppl --eval ev2.jsonl``).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gate_quality  # noqa: E402
from seer_attn.modeling_seer import selection, seer_layer  # noqa: E402
from seer_attn.modeling_seer.gate import gate_distill_loss  # noqa: E402
from seer_attn.modeling_seer.selection import MASKED_LOGIT, keep_rule_mask  # noqa: E402

KEEP = gate_quality.KEEP
_select_blocks = selection.select_blocks


def _forced(NB, device, keep_diagonal, keep_sink, keep_local, window=None, block_size=64):
    """The blocks the keep rules add whatever the scores say, the last rows' dense rule aside."""
    return keep_rule_mask(NB, keep_diagonal, keep_sink, keep_local, 0, window, block_size, device)


def free_select_blocks(scores, method, *args, **kw):
    """select_blocks with the forced blocks' scores masked first (the keep rules add them back)."""
    forced = _forced(scores.shape[-1], scores.device, kw.get("keep_diagonal", True), kw.get("keep_sink", False),
                     kw.get("keep_local", 0), kw.get("window"), kw.get("block_size", 64))
    return _select_blocks(scores.masked_fill(forced, MASKED_LOGIT), method, *args, **kw)


def free_distill_loss(scores, target, skip_fraction=0.25, peak_weight=0.0):
    """The paper's KL over the blocks the protocol's keep rules leave to the gate: forced blocks
    masked in the gate's softmax, the target renormalised over the rest (rows with no free
    block contribute zero)."""
    forced = _forced(scores.shape[-1], scores.device, KEEP["seer_keep_diagonal"], KEEP["seer_keep_sink"],
                     KEEP["seer_keep_local"])
    t = target.detach().float().masked_fill(forced, 0.0)
    t = t / t.sum(-1, keepdim=True).clamp_min(1e-30)
    return gate_distill_loss(scores.masked_fill(forced, MASKED_LOGIT), t, skip_fraction, peak_weight)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "infer"):
        raise SystemExit("first argument: train (distillation and selection) or infer (selection only)")
    mode, rest = argv[0], argv[1:]
    selection.select_blocks = free_select_blocks  # select_blocks_for and selection_density call it by name
    if mode == "train":
        seer_layer.gate_distill_loss = free_distill_loss
    print(f"free-block gate screen, mode {mode}: forced blocks {KEEP}", flush=True)
    torch.manual_seed(0)
    gate_quality.main(rest)


if __name__ == "__main__":
    main()
