"""Time to first token of a Llama-3.1-8B-shaped model with random weights, dense vs seer.

bf16, batch 1, no KV cache kept, logits for the last token only (``logits_to_keep=1``).
Rows: transformers' SDPA with the flash and cuDNN backends (dense mode), and seer sparse
prefill with the gate at ``nz_ratio`` 0.3 / 0.1 (random gates: the gate picks blocks, the
count per row is what nz_ratio fixes). Also the gate + block-mask overhead per layer as a
share of one layer's dense attention time.

    python -m seer_attn.eval.bench_ttft --lengths 32768 65536 131072 --out seer_outputs/ttft

Writes ``ttft.json`` (a results envelope of kind ``"ttft"``, :mod:`seer_attn.training.results`:
provenance, config, rows, plus ``overhead``) and ``ttft.csv``. Needs a CUDA GPU (without one:
a one-line error, exit code 2).
"""
import argparse
import json
import os
from dataclasses import asdict, dataclass

import torch

from seer_attn.training import cli_args as ca
from seer_attn.training.run_config import RunConfig, config_from_args, default, option, text
from .bench_kernels import write_csv


def _time_s(fn, reps=3):
    fn()  # warm-up (Triton compilation, cuDNN plans)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def llama8b_config(max_len, layers=32):
    from seer_attn.modeling_seer import SeerLlamaConfig
    return SeerLlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max(131072, max_len),
                           rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                           tie_word_embeddings=False)


def overhead(T, bench):
    """Gate scoring + selection + index conversion vs dense attention, one layer, 8B shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from seer_attn.kernels import block_mask_to_indices
    from seer_attn.modeling_seer.gate import AttnGate, select_blocks
    dev, dt = "cuda", torch.bfloat16
    gate = AttnGate(32, 8, 128).to(dev)
    q = torch.randn(1, 32, T, 128, device=dev, dtype=dt)
    k = torch.randn(1, 8, T, 128, device=dev, dtype=dt)
    v = torch.randn(1, 8, T, 128, device=dev, dtype=dt)
    NB = T // 64
    pos = torch.arange(NB, device=dev)[None] * 64
    inv = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, device=dev).float() / 128))
    e = torch.cat([pos[..., None] * inv] * 2, -1)
    rope = (e.cos(), e.sin())

    def gate_and_mask():
        with torch.no_grad():
            m = select_blocks(gate(q, k, rope), "nz_ratio", nz_ratio=0.1)
            block_mask_to_indices(m)

    def dense():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    g, d = bench(gate_and_mask), bench(dense)
    return {"T": T, "gate_mask_ms": g, "dense_attn_ms": d, "overhead_share": g / d}


@dataclass(frozen=True, kw_only=True)
class TTFTBenchConfig(RunConfig):
    """One time-to-first-token benchmark run (each field is the option of the same name)."""

    lengths: tuple = option((32768, 65536, 131072), ca.int_at_least(64), many="+")
    nz_ratios: tuple = option((0.3, 0.1), ca.unit_interval, many="+")
    layers: int = option(32, ca.positive_int)
    reps: int = option(3, ca.positive_int)
    out: str = option("seer_outputs/ttft", text)


def _default(name):
    return default(TTFTBenchConfig, name)


def parser() -> argparse.ArgumentParser:
    """The command line of the benchmark (module docstring; defaults: :class:`TTFTBenchConfig`'s)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=ca.int_at_least(64), nargs="+", default=_default("lengths"),
                    help="prompt lengths in tokens")
    ap.add_argument("--nz-ratios", type=ca.unit_interval, nargs="+", default=_default("nz_ratios"),
                    help="gate nz_ratio of each seer row")
    ap.add_argument("--layers", type=ca.positive_int, default=_default("layers"),
                    help="decoder layers of the 8B-shaped model")
    ap.add_argument("--reps", type=ca.positive_int, default=_default("reps"),
                    help="timed prefills per setting (median)")
    ap.add_argument("--out", default=_default("out"), help="output folder (default: %(default)s)")
    return ap


def main(argv=None):
    ap = parser()
    config = config_from_args(TTFTBenchConfig, ap.parse_args(argv), parser=ap)
    ca.require_cuda(ap.prog)
    return run_ttft_bench(config)


def run_ttft_bench(config: TTFTBenchConfig) -> dict:
    """The benchmark (module docstring) as ``config`` says, on the CUDA GPU; returns the
    envelope written to ``ttft.json``."""
    if not isinstance(config, TTFTBenchConfig):
        raise TypeError(f"run_ttft_bench takes a TTFTBenchConfig, got {type(config).__name__}")
    if not torch.cuda.is_available():
        raise ValueError("the TTFT benchmark needs a CUDA GPU, and torch sees none")

    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from seer_attn.modeling_seer import SeerLlamaForCausalLM

    os.makedirs(config.out, exist_ok=True)
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")  # noqa: E731
    over = [overhead(T, bench) for T in sorted({32768, *[t for t in config.lengths if t <= 65536]})]
    for o in over:
        print("overhead", json.dumps(o), flush=True)

    cfg = llama8b_config(max(config.lengths), config.layers)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = SeerLlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    rows = []
    for T in config.lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, T), device="cuda")
        settings = [("sdpa_flash", "dense", SDPBackend.FLASH_ATTENTION, None),
                    ("sdpa_cudnn", "dense", SDPBackend.CUDNN_ATTENTION, None)]
        settings += [(f"seer_nz{r:g}", "sparse", SDPBackend.FLASH_ATTENTION, r) for r in config.nz_ratios]
        row = {"T": T}
        for name, mode, backend, nz in settings:
            model.set_seer_mode(mode, seer_sparsity_method="nz_ratio", seer_nz_ratio=nz or 0.3)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

            def step():
                with torch.no_grad(), sdpa_kernel(backend):
                    return model(ids, logits_to_keep=1, use_cache=False).logits
            try:
                row[name] = _time_s(step, config.reps)
                row[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                if mode == "sparse":
                    row[f"{name}_density"] = model.seer_density().mean().item()
            except torch.OutOfMemoryError:
                row[name] = float("nan")
                print(f"{name} at {T}: out of memory", flush=True)
            print(name, T, row.get(name), flush=True)
        rows.append(row)
        print("row", json.dumps(row), flush=True)
    env = write_results(config, rows, over, "cuda")
    print(f"\n# TTFT seconds, {env['provenance']['gpu']}, {config.layers} layers, bf16, random weights")
    names = ["sdpa_flash", "sdpa_cudnn"] + [f"seer_nz{r:g}" for r in config.nz_ratios]
    print(" | ".join(["T"] + names + [f"flash/{n}" for n in names[2:]] + ["density"]))
    for r in rows:
        sp = [f"{r['sdpa_flash'] / r[n]:.2f}x" if r.get(n) == r.get(n) and n in r else "-" for n in names[2:]]
        dens = [f"{r.get(f'{n}_density', float('nan')):.3f}" for n in names[2:]]
        print(" | ".join([str(r["T"])] + [f"{r.get(n, float('nan')):.3f}" for n in names] + sp + ["/".join(dens)]))
    for o in over:
        print(f"gate+mask overhead at {o['T']}: {o['gate_mask_ms']:.3f} ms vs dense attention "
              f"{o['dense_attn_ms']:.2f} ms per layer = {100 * o['overhead_share']:.1f}%")
    return env


def write_results(config, rows, over, device) -> dict:
    """Write ``ttft.json`` (the envelope, returned: ``config`` the :class:`TTFTBenchConfig`) and
    ``ttft.csv`` to ``config.out``."""
    from seer_attn.training.results import write_envelope
    env = write_envelope(os.path.join(config.out, "ttft.json"), "ttft", rows, config=asdict(config),
                         model=f"random weights, Llama-3.1-8B shape, {config.layers} layers, bf16", device=device,
                         overhead=over)
    write_csv(os.path.join(config.out, "ttft.csv"), rows)
    return env


if __name__ == "__main__":
    main()
