"""Quality of sparse decode: distil prefill + decode gates, then "decode perplexity" and passkey
retrieval, dense vs sparse decode, in one run (docs/design.md §4).

**Decode perplexity.** Windows of ``--length`` (8192) tokens of the evaluation corpus
(:func:`seer_attn.eval.perplexity.make_windows`, documents encoded without special tokens).
Tokens ``[0, L/2)`` are one prefill into a KV cache; tokens ``L/2 .. L-1`` are then scored as
decode steps: token ``L/2`` from the prefill's last logits, every later token t from the
decode step that fed token t-1 against the cache of everything before
(:func:`graph_decode_nll`: graph-mode steps over a static cache, replayed from a CUDA graph;
:func:`decode_nll` runs the same as eager forwards over a dynamic cache, ~70 ms a step on an
H200 at batch 16, which made one setting of the protocol take ~5 minutes). The prefill is
dense in every setting, so only decode differs. PPL is exp of the mean NLL over the scored
tokens; ``ratio`` is PPL over the dense-decode PPL. The eager loop is checked against
``generate`` (:func:`generate_nll`: each step's token forced to the window's, raw logits
returned) and the graph loop against the eager one on a small case first.

**Passkey.** :func:`seer_attn.eval.passkey.run_passkey` (needle in the prompt, greedy
answer) dense, with sparse decode (dense prefill), and with sparse prefill and sparse
decode together, each paired prompt by prompt against dense (lost, gained, sign-test p).

**Gates.** Distilled here (``GateDistillationTrainer``: the prefill gates' KL plus the decode
gates' KL on ``--decode-rows`` sampled query rows per sequence, docs/design.md §2; with
``--retrieval-mix`` a share of the sequences rewritten with retrieval structure: 256 rows and a
quarter by default, which kept passkey retrieval at share 0.1 where 64 rows of plain text lost
14 of 75 prompts, docs/experiments/decode_quality.md) unless
``--gates`` names a file with decode gates. They are saved to ``--out`` in bfloat16.

**Comparisons.** A setting may name a selector other than the decode gate: ``oracle`` (the
step's true attention mass per block: what the gate is distilled to predict, an upper bound
at the same share) and ``streaming`` (the most recent blocks); ``local=N`` keeps the N full
blocks before the current one besides the selection; ``prior=A`` mixes the decode gate's
scores with the training-free mean-pooled prior (``seer_decode_meanpool_prior``); ``keys=f8`` /
``keys=i8`` stores the gate's block keys in 8 bits (``seer_decode_key_format``).

    seer-attn decode-quality --model /tmp/seer/smollm2.gguf --train /tmp/seer/corpora/train.jsonl \\
        --eval /tmp/seer/corpora/eval.jsonl --settings share=0.1 budget=2048 budget=2048,prior=0.7

(or ``python -m seer_attn.eval.decode_quality``) or from Python, ``run_decode_quality(DecodeQualityConfig(model=...,
steps=300))``. ``seer-attn export --results .../decode_quality.json`` then gives the model's card a
sparse-decode section (docs/hub.md).

Writes
``decode_quality.json`` (a results envelope of kind ``"decode_quality"``: provenance,
``config`` the :class:`DecodeQualityConfig`, the perplexity rows, plus ``passkey``, ``checks``
and ``cost``) and ``decode_quality.md``, rewritten after every phase with ``complete: false``
until the end.
"""
import argparse
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from seer_attn.modeling_seer.decode_graph import cache_arg
from seer_attn.training import cli_args as ca
from seer_attn.training.distill import DECODE_ROWS
from seer_attn.training.run_config import ConfigError, RunConfig, config_from_args, default, flag, option, text

from .settings import apply_decode, decode_setting, decode_setting_name, decode_setting_text

PHASES = ("distill", "check", "ppl", "passkey")
DEFAULT_OUTPUT = "seer_outputs/decode-quality"


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def decode_nll(model, input_ids, prefix):
    """Per-token NLL of ``input_ids[:, prefix:]`` scored as decode steps (module docstring).

    Args:
        input_ids: long ``[B, L]`` windows of equal length (no padding), ``1 <= prefix < L``.

    Returns:
        float64 ``[B, L - prefix]`` NLL of tokens ``prefix .. L-1``.
    """
    from transformers import DynamicCache
    B, L = input_ids.shape
    if not 1 <= prefix < L:
        raise ValueError(f"prefix={prefix} is invalid: expected 1 <= prefix < {L}")
    cache = DynamicCache(config=model.config)
    kw = {cache_arg(model): cache, "use_cache": True}
    logits = model(input_ids=input_ids[:, :prefix], logits_to_keep=1, **kw).logits[:, -1]
    out = []
    for t in range(prefix, L):
        out.append(F.cross_entropy(logits.float(), input_ids[:, t], reduction="none").double())
        if t + 1 < L:
            logits = model(input_ids=input_ids[:, t:t + 1], **kw).logits[:, -1]
    return torch.stack(out, 1)


@torch.no_grad()
def graph_decode_nll(model, input_ids, prefix, cuda_graph=None):
    """:func:`decode_nll` through graph-mode decode steps (``seer_generate``'s: the prefill's
    cache moved into a static one, every step replayed from a CUDA graph; eagerly on a CPU),
    teacher-forced: the same
    NLLs without the host work of ~``L - prefix`` eager forwards.

    Returns float64 ``[B, L - prefix]``."""
    from seer_attn.modeling_seer.decode_graph import GraphDecoder, graph_prefill
    B, L = input_ids.shape
    if not 1 <= prefix < L:
        raise ValueError(f"prefix={prefix} is invalid: expected 1 <= prefix < {L}")
    logits, cache, mask, pos = graph_prefill(model, input_ids[:, :prefix], torch.ones_like(input_ids[:, :prefix]), L)
    first = F.cross_entropy(logits.float(), input_ids[:, prefix], reduction="none").double()[:, None]
    if prefix + 1 == L:
        return first
    dec = GraphDecoder(model, cache, input_ids[:, prefix:prefix + 1].clone(), pos, prefix, mask,
                       forced=input_ids[:, prefix + 1:].contiguous())
    cuda_graph = input_ids.is_cuda if cuda_graph is None else cuda_graph
    for _ in range(L - prefix - 1):
        dec.step(cuda_graph=cuda_graph)
    return torch.cat([first, dec.nll.double()], dim=1)


@torch.no_grad()
def generate_nll(model, input_ids, prefix, pad_token_id=0):
    """The same NLLs as :func:`decode_nll` through ``model.generate``: every generated token
    is forced to the window's (``prefix_allowed_tokens_fn``) and the raw logits of each step
    are scored."""
    B, L = input_ids.shape
    ref = input_ids

    def allowed(batch_id, ids):
        return [int(ref[batch_id, ids.shape[-1]])]

    out = model.generate(input_ids[:, :prefix], attention_mask=torch.ones_like(input_ids[:, :prefix]),
                         max_new_tokens=L - prefix, min_new_tokens=L - prefix, do_sample=False, num_beams=1,
                         prefix_allowed_tokens_fn=allowed, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=pad_token_id)
    if not torch.equal(out.sequences, input_ids):
        raise RuntimeError("generate did not follow the forced tokens")
    logits = torch.stack(out.logits, 1).float()  # [B, L - prefix, V]
    return F.cross_entropy(logits.transpose(1, 2), input_ids[:, prefix:], reduction="none").double()


def decode_perplexity(model, windows, prefix, batch_size, progress=True, desc="decode ppl", graph=True):
    """:func:`graph_decode_nll` (``graph``; else :func:`decode_nll`, the eager steps) over
    ``windows`` (:class:`~seer_attn.eval.perplexity.Window` of one length) in batches: dict with
    ``ppl``, ``nll``, ``tokens``, ``windows``, ``decode_density`` (mean kept share of the KV
    blocks; None with dense decode) and ``seconds``."""
    from tqdm.auto import tqdm
    from .perplexity import model_device
    dev = model_device(model)
    total, count, dens = 0.0, 0, []
    t0 = time.time()
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress):
        ids = torch.stack([w.input_ids for w in windows[i:i + batch_size]]).to(dev)
        nll = graph_decode_nll(model, ids, prefix) if graph else decode_nll(model, ids, prefix)
        total += nll.sum().item()
        count += nll.numel()
        if model.config.seer_decode_sparsity:
            dens += model.seer_decode_density().tolist()
    return {"ppl": float(torch.tensor(total / count).exp()), "nll": total / count, "tokens": count,
            "windows": len(windows), "decode_density": sum(dens) / len(dens) if dens else None,
            "seconds": time.time() - t0}


# ----------------------------------------------------------------------------- settings

# ----------------------------------------------------------------------------- the run

@dataclass(frozen=True, kw_only=True)
class DecodeQualityConfig(RunConfig):
    """One decode-quality run (each field is the option of the same name, see :func:`parser`)."""

    model: str | None = option(None, text)  # None: the embedded SmolLM2 GGUF
    gates: str | None = option(None, text)  # distilled gates with decode gates: no distill phase
    train: tuple | None = option(None, text, many="+")  # None: the bundled training corpus
    eval: str | None = option(None, text)  # None: the bundled eval corpus
    steps: int = option(300, ca.positive_int)  # distillation steps
    seq_len: int = option(8192, ca.int_at_least(256))  # distillation sequence length
    # the decode gates' recipe: 256 query rows per sequence and a quarter of the sequences with
    # retrieval structure kept passkey at share 0.1 (1 of 75 lost, 14 with 64 rows of plain text)
    decode_rows: int = option(DECODE_ROWS, ca.positive_int)  # query rows per sequence the decode gates learn from
    retrieval_mix: float = option(0.25, ca.float_in(0, 1, low_open=False))  # share of retrieval sequences
    forced_loss: bool = option(False, flag)  # the decode loss spans the always-read blocks (seer_decode_distill_forced)
    length: int = option(8192, ca.int_at_least(256))  # decode-perplexity window (second half: decode steps)
    windows: int = option(16, ca.positive_int)  # decode-perplexity windows (at most)
    batch_size: int = option(16, ca.positive_int)  # windows decoded together
    # the last: the mean-pooled prior at 0.7, the setting that met issue 15's 1.02x at 2048 tokens (session 37-38)
    settings: tuple = option(("share=0.1", "budget=2048", "budget=2048,prior=0.7"), decode_setting_text,
                             many="+")  # sparse decode settings
    # (the first one also runs with sparse prefill in the passkey phase)
    passkey_lengths: tuple = option((2048, 4096, 8192), ca.positive_int, many="*")
    passkey_samples: int = option(5, ca.positive_int)  # prompts per (length, depth) cell (5 depths)
    prefill_threshold: float = option(2e-3, ca.open_unit_interval)  # the sparse-prefill passkey run's threshold
    phases: tuple = option(PHASES, many="+", choices=PHASES)
    out: str = option(DEFAULT_OUTPUT, text)
    no_progress: bool = option(False, flag)
    cpu: bool = option(False, flag)  # smoke test on the CPU (tiny sizes only)

    def check(self):
        if "distill" in self.phases and self.gates:
            raise ConfigError("{gates} skips distillation: drop 'distill' from {phases} or drop {gates}",
                              "gates", "phases")
        if "distill" not in self.phases and not self.gates:
            raise ConfigError("without the distill phase, {gates} must name distilled gates (with decode gates)",
                              "gates", "phases")


def _default(name):
    return default(DecodeQualityConfig, name)


def parser():
    """The command line (defaults: :class:`DecodeQualityConfig`'s)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2 GGUF")
    ap.add_argument("--gates", default=None, help="distilled gates with decode gates (skips the distill phase)")
    ap.add_argument("--train", nargs="+", default=None, help="training files (default: bundled corpus)")
    ap.add_argument("--eval", default=None, help="evaluation jsonl (default: bundled eval corpus)")
    ap.add_argument("--steps", type=ca.positive_int, default=_default("steps"), help="distillation steps")
    ap.add_argument("--seq-len", type=ca.int_at_least(256), default=_default("seq_len"),
                    help="distillation sequence length")
    ap.add_argument("--decode-rows", type=ca.positive_int, default=_default("decode_rows"),
                    help="query rows per training sequence the decode gates are distilled on "
                         "(seer_decode_distill_rows; default: %(default)s)")
    ap.add_argument("--retrieval-mix", type=ca.float_in(0, 1, low_open=False), default=_default("retrieval_mix"),
                    help="share of the distillation sequences rewritten with retrieval structure "
                         "(seer_attn.training.retrieval_data; 0: plain text; default: %(default)s)")
    ap.add_argument("--length", type=ca.int_at_least(256), default=_default("length"),
                    help="decode-perplexity window; its second half is scored as decode steps")
    ap.add_argument("--windows", type=ca.positive_int, default=_default("windows"),
                    help="decode-perplexity windows (at most)")
    ap.add_argument("--batch-size", type=ca.positive_int, default=_default("batch_size"),
                    help="windows decoded together")
    ap.add_argument("--settings", type=decode_setting_text, nargs="+", default=_default("settings"), metavar="SETTING",
                    help="sparse decode settings: share=X, budget=N or mass=P (the predicted attention mass "
                         "read), optionally with ,local=N (full blocks before the current one always read), "
                         ",prior=A (seer_decode_meanpool_prior), ,keys=i8|f8|model (the gate keys, "
                         "seer_decode_key_format; without it: the model's dtype) "
                         "and ,oracle or ,streaming (comparison selectors); "
                         "the first also runs with sparse prefill in the passkey phase (default: %(default)s)")
    ap.add_argument("--passkey-lengths", type=ca.positive_int, nargs="*", default=_default("passkey_lengths"))
    ap.add_argument("--passkey-samples", type=ca.positive_int, default=_default("passkey_samples"),
                    help="prompts per (length, depth) cell (5 depths)")
    ap.add_argument("--prefill-threshold", type=ca.open_unit_interval, default=_default("prefill_threshold"),
                    help="gate threshold of the sparse-prefill passkey run (sink, one local block and the last two "
                         "block rows kept)")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=_default("phases"))
    ap.add_argument("--out", default=_default("out"), help="output folder (default: %(default)s)")
    ap.add_argument("--forced-loss", action="store_true",
                    help="distil the decode gates with the sink in the loss, as up to session 37 "
                         "(seer_decode_distill_forced=True; default: the blocks a step decides only)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="smoke-test on the CPU (tiny sizes only)")
    return ap


def main(argv=None):
    ap = parser()
    config = config_from_args(DecodeQualityConfig, ap.parse_args(argv), parser=ap)
    if not config.cpu:
        ca.require_cuda(ap.prog, " (or pass --cpu for a smoke test)")
    return run_decode_quality(config)


class Report:
    """Everything measured so far, rewritten to ``decode_quality.json`` / ``.md`` on each save."""

    def __init__(self, config):
        self.config, self.rows, self.passkey, self.checks, self.cost = config, [], {}, [], {}

    def text(self):
        lines = ["| decode | PPL | vs dense | kept share of KV blocks | windows | s |", "|---|---|---|---|---|---|"]
        dense = next((r["ppl"] for r in self.rows if r["setting"] == "dense"), None)
        for r in self.rows:
            ratio = f"{r['ppl'] / dense:.4f}x" if dense else "-"
            dens = f"{r['decode_density']:.3f}" if r["decode_density"] is not None else "1"
            lines.append(f"| {r['setting']} | {r['ppl']:.4f} | {ratio} | {dens} | {r['windows']} | {r['seconds']:.0f} |")
        for name, res in self.passkey.items():
            acc = " ".join(f"{n}: {a:.3f}" for n, a in res["per_length"].items())
            line = f"passkey {name}: accuracy {res['accuracy']:.3f} ({acc})"
            if res.get("vs_dense"):
                v = res["vs_dense"]
                line += f"; vs dense: lost {v['lost']}, gained {v['gained']} of {v['n']} (sign test p={v['p_value']:.3g})"
            if res.get("density") is not None:
                line += f"; prefill density {res['density']:.3f}"
            lines.append(line)
        for c in self.checks:
            lines.append(f"check: {json.dumps(c)}")
        if self.cost:
            lines.append(f"cost: {json.dumps(self.cost)}")
        return "\n".join(lines)

    def save(self, complete=False) -> dict:
        """Write the envelope and the markdown; returns the envelope."""
        from seer_attn.training.results import write_envelope
        config = self.config
        passkey = {k: {**v, "samples": [{kk: vv for kk, vv in r.items() if kk != "prompt"} for r in v["samples"]]}
                   for k, v in self.passkey.items()}
        env = write_envelope(os.path.join(config.out, "decode_quality.json"), "decode_quality", self.rows,
                             config=asdict(config), model=config.model or ca.DEFAULT_MODEL_LABEL,
                             device="cpu" if config.cpu else "cuda", complete=complete, passkey=passkey,
                             checks=self.checks, cost=self.cost)
        status = "" if complete else "**partial run: not every phase finished**\n\n"
        tmp = os.path.join(config.out, "decode_quality.md.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(status + self.text() + "\n")
        os.replace(tmp, os.path.join(config.out, "decode_quality.md"))
        return env


def run_decode_quality(config: DecodeQualityConfig) -> dict:
    """Every phase ``config`` names (module docstring); needs a CUDA GPU unless ``config.cpu``.
    Returns the envelope written last to ``decode_quality.json``."""
    if not isinstance(config, DecodeQualityConfig):
        raise TypeError(f"run_decode_quality takes a DecodeQualityConfig, got {type(config).__name__}")
    if not config.cpu and not torch.cuda.is_available():
        raise ValueError("cpu=False needs a CUDA GPU, and torch sees none (cpu=True runs a smoke test)")
    from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer
    from .perplexity import load_documents, make_windows

    dev, dtype = ("cpu", torch.float32) if config.cpu else ("cuda", torch.bfloat16)
    os.makedirs(config.out, exist_ok=True)
    report = Report(config)
    settings = [decode_setting(t) for t in config.settings]
    tok = load_tokenizer(config.model)
    if "distill" in config.phases:
        model = distill(config, tok, dtype, dev, report)
    else:
        model = load_seer_model(config.model, dtype=dtype, device=dev, gates=config.gates, seer_decode_gate=True)
    model.eval()
    windows = make_windows(load_documents(config.eval), tok, config.length, 2)[:config.windows]
    if not windows:
        raise ValueError(f"no evaluation window of {config.length} tokens in "
                         f"{config.eval or 'the bundled eval corpus'}")
    prefix = config.length // 2
    progress = not config.no_progress

    if "check" in config.phases:  # the decode loop against generate, on a small case, with sparse decode
        ids = windows[0].input_ids[None, :min(config.length, 1024)].to(dev)
        apply_decode(model, settings[0])
        a, b = decode_nll(model, ids, ids.shape[1] // 2), generate_nll(model, ids, ids.shape[1] // 2,
                                                                        tok.pad_token_id or 0)
        g = graph_decode_nll(model, ids, ids.shape[1] // 2)
        report.checks.append({"decode_nll_vs_generate_max_abs": (a - b).abs().max().item(),
                              "graph_decode_nll_vs_decode_nll_max_abs": (g - a).abs().max().item(),
                              "tokens": a.numel(), "setting": decode_setting_name(settings[0])})
        report.save()
        print("check", json.dumps(report.checks[-1]), flush=True)

    if "ppl" in config.phases:
        for setting in [{}] + settings:
            apply_decode(model, setting)
            res = decode_perplexity(model, windows, prefix, config.batch_size, progress,
                                    desc=decode_setting_name(setting))
            report.rows.append({"setting": decode_setting_name(setting), "prefill": "dense", "prefix": prefix,
                                "length": config.length, **res})
            report.save()
            print("ppl", json.dumps(report.rows[-1]), flush=True)

    if "passkey" in config.phases and config.passkey_lengths:
        passkey(model, tok, config, settings, report)
    env = report.save(complete=True)
    print("\n" + report.text())
    return env


def distill(config, tok, dtype, dev, report):
    """Distil prefill and decode gates (GateDistillationTrainer, in memory), save them in bf16."""
    from transformers import set_seed
    from seer_attn.modeling_seer.conversion import load_seer_model
    from seer_attn.training.data import load_documents, pack_documents
    from seer_attn.training.trainer import GateDistillationTrainer, SeerTrainingArguments

    docs = load_documents(config.train)
    data = pack_documents(docs, tok, config.seq_len, seed=0)
    if config.retrieval_mix:
        from seer_attn.training.retrieval_data import mix_retrieval
        data = mix_retrieval(data, config.retrieval_mix, seed=0, tokenizer=tok)
    set_seed(0)
    model = load_seer_model(config.model, dtype=dtype, seer_mode="distill", seer_decode_gate=True,
                            seer_decode_distill_rows=config.decode_rows,
                            seer_decode_distill_forced=config.forced_loss)
    targs = SeerTrainingArguments(output_dir=os.path.join(config.out, "work"), max_steps=config.steps,
                                  per_device_train_batch_size=1, bf16=not config.cpu, use_cpu=config.cpu,
                                  logging_steps=25, save_strategy="no", save_final_model=False, seed=0,
                                  report_to="none", disable_tqdm=config.no_progress)
    if not config.cpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    trainer = GateDistillationTrainer(model=model, args=targs, train_dataset=data)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    report.cost = {"train_seconds": time.time() - t0, "steps": config.steps, "seq_len": config.seq_len,
                   "final_loss": logged[-1]["loss"] if logged else None,
                   "peak_gib": None if config.cpu else torch.cuda.max_memory_allocated() / 2**30}
    model.save_gates(os.path.join(config.out, "gates_decode_bf16.safetensors"), dtype=torch.bfloat16)
    report.save()
    print("cost", json.dumps(report.cost), flush=True)
    return model.to(dev)


def passkey(model, tok, config, settings, report):
    from .passkey import paired_passkey, run_passkey
    progress = not config.no_progress
    prefill_opts = dict(seer_sparsity_method="threshold", seer_threshold=config.prefill_threshold,
                        seer_keep_sink=True, seer_keep_local=1, seer_dense_last_rows=2)
    runs = [("dense", {}, "dense")]
    runs += [(f"decode_{decode_setting_name(s)}", s, "dense") for s in settings]
    runs.append((f"prefill_threshold_{config.prefill_threshold:g}+decode_{decode_setting_name(settings[0])}",
                 settings[0], "sparse"))
    for name, setting, prefill in runs:
        apply_decode(model, setting, prefill, prefill_opts if prefill == "sparse" else None)
        res = run_passkey(model, tok, config.passkey_lengths, samples_per_cell=config.passkey_samples,
                          progress=progress)
        if name != "dense":
            res["vs_dense"] = paired_passkey(report.passkey["dense"], res)
        report.passkey[name] = res
        report.save()
        print("passkey", name, json.dumps({k: res[k] for k in ("accuracy", "per_length")}),
              json.dumps(res.get("vs_dense")), flush=True)
    apply_decode(model, {}, "dense")


if __name__ == "__main__":
    main()
