"""GPU: why the static-cache case of tests/modeling_seer/test_decode_gpu.py misses its bound.

transformers compiles a static cache's decode steps on CUDA; sparse decode turns that compile off
(docs/decode.md). This prints, per pair of runs, the largest logit difference over all steps and
the step it occurs at, so that compile rounding and a decode-kernel error can be told apart::

    python docs/experiments/decode_static_diag.py
"""
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests" / "modeling_seer"))
from test_decode_gpu import _batch, _model, _run  # noqa: E402


@torch.no_grad()
def main():
    m = _model()
    ids, mask = _batch()
    runs = {}
    seq, runs["dense dynamic"] = _run(m, ids, mask)

    def forced(b, prefix):
        return [int(seq[b, prefix.shape[-1]])]
    _, runs["dense static (compiled)"] = _run(m, ids, mask, cache_implementation="static",
                                              prefix_allowed_tokens_fn=forced)
    m.generation_config.disable_compile = True
    _, runs["dense static eager"] = _run(m, ids, mask, cache_implementation="static",
                                         prefix_allowed_tokens_fn=forced)
    m.generation_config.disable_compile = False
    m.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_method="share", seer_decode_share=1.0)
    _, runs["sparse 1.0 dynamic"] = _run(m, ids, mask, prefix_allowed_tokens_fn=forced)
    _, runs["sparse 1.0 static"] = _run(m, ids, mask, cache_implementation="static", prefix_allowed_tokens_fn=forced)
    ref = runs["dense dynamic"]
    print("max |logit|:", ref.abs().max().item())
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = (runs[a] - runs[b]).abs()
            per_step = d.amax(dim=(0, 2))
            print(f"{a:26s} vs {b:26s}: max {d.max().item():.4f} at step {int(per_step.argmax())}, "
                  f"per row {[round(x, 3) for x in d.amax(dim=(1, 2)).tolist()]}, step 0 {per_step[0].item():.4f}")


if __name__ == "__main__":
    main()
