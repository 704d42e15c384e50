"""Inputs shared by the decode tests (test_decode.py, test_decode_graph.py): random prompts,
left-padded batches, greedy generate, and the name of transformers' KV-cache argument."""
import inspect

import torch
from transformers import LlamaForCausalLM

DECODE = dict(seer_decode_gate=True)
# transformers >= 5.2x renamed the cache argument (``past_key_values`` -> ``cache``)
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def ids(T, B=1, seed=0):
    return torch.randint(1, 96, (B, T), generator=torch.Generator().manual_seed(seed))


def left_pad(seqs, T):
    out = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, T - len(s):] = s
        mask[i, T - len(s):] = 1
    return out, mask


def greedy(m, input_ids, n, **kw):
    return m.generate(input_ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
