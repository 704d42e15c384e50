"""Where the host time of a 32k fine-tuning step goes (issue 13: row (c) at density 0.1 takes
0.376 s/step with ``compile_pointwise`` while the GPU is busy only ~70% of it).

A SmolLM2-135M-shaped Seer model (random weights: the cost of a step does not depend on what
the weights are; random gates still keep 10% of the blocks) is trained by
:class:`SeerFineTuneTrainer` with the recipe of docs/finetune.md (bf16 autocast over float32
weights, activation checkpointing, YaRN factor 4, 32768 tokens, batch 1) for each variant;
s/step is the median after 3 steps. For the first variant one more step is profiled twice:
``torch.profiler`` (CPU ops by self time, kernel launches, GPU busy time) and ``cProfile``
(Python functions by own time). Needs no staging (no model file, random tokens).

    python docs/experiments/ft_host_profile.py --out OUT [--variants stride-compile frozen-compile]
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import tempfile
import time

import torch
from transformers import TrainerCallback

from seer_attn.modeling_seer import SeerLlamaConfig, SeerLlamaForCausalLM
from seer_attn.training.finetune_trainer import FineTuneArguments, SeerFineTuneTrainer
from seer_attn.training.results import write_envelope

#: SmolLM2-135M's architecture (its config.json)
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
               rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
#: variant -> FineTuneArguments changes (density 0.1, gate loss 1 layer in 4 unless changed)
VARIANTS = {
    "stride-compile": dict(compile_pointwise=True),
    "frozen-compile": dict(compile_pointwise=True, train_gates=False),
    "stride": dict(),
    "dense-compile": dict(compile_pointwise=True, density=1.0, train_gates=False),
    # compile_pointwise before the decoder layer ran as two graphs (each piece compiled alone)
    "stride-compile-unfused": dict(compile_pointwise=True),
}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer(TrainerCallback):
    def __init__(self):
        self.t = []

    def on_step_begin(self, args, state, control, **kw):
        if not self.t:
            _sync()
            self.t.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        _sync()
        self.t.append(time.perf_counter())


class Profile(TrainerCallback):
    """torch.profiler over step ``at``, cProfile over step ``at + 1`` (1-based)."""

    def __init__(self, at):
        self.at, self.prof, self.cprof, self.report = at, None, None, {}

    def on_step_begin(self, args, state, control, **kw):
        step = state.global_step + 1
        _sync()
        if step == self.at:
            from torch.profiler import ProfilerActivity, profile
            self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
            self.prof.__enter__()
        elif step == self.at + 1:
            self.cprof = cProfile.Profile()
            self.cprof.enable()

    def on_step_end(self, args, state, control, **kw):
        _sync()
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.report["torch_profiler"] = summarize(self.prof)
            self.prof = None
        elif self.cprof is not None:
            self.cprof.disable()
            s = io.StringIO()
            st = pstats.Stats(self.cprof, stream=s)
            st.sort_stats("tottime").print_stats(40)
            st.sort_stats("cumulative").print_stats(60)
            self.report["cprofile"] = s.getvalue()
            self.cprof = None


def summarize(prof):
    from torch.autograd import DeviceType
    ev = prof.events()
    cpu, gpu, launches = {}, 0.0, 0
    for e in ev:
        if e.device_type == DeviceType.CPU:
            ms, n = cpu.get(e.name, (0.0, 0))
            cpu[e.name] = (ms + e.self_cpu_time_total / 1e3, n + 1)
            if "LaunchKernel" in e.name or e.name in ("cudaLaunchKernelExC", "cuLaunchKernelEx"):
                launches += 1
        else:
            gpu += e.device_time_total / 1e3
    top = sorted(cpu.items(), key=lambda kv: -kv[1][0])[:45]
    return {"gpu_busy_ms": gpu, "kernel_launches": launches, "cpu_self_ms_total": sum(v[0] for v in cpu.values()),
            "cpu_top": [{"name": k[:90], "self_ms": v[0], "calls": v[1]} for k, v in top]}


def run(variant, steps, seq_len, profile, out):
    from seer_attn.modeling_seer.seer_layer import SeerDecoderLayerMixin
    fused = SeerDecoderLayerMixin.forward
    if variant.endswith("-unfused"):  # the stock layer's forward, the pieces compiled one by one
        SeerDecoderLayerMixin.forward = lambda self, *a, **k: super(SeerDecoderLayerMixin, self).forward(*a, **k)
    try:
        return _run(variant, steps, seq_len, profile, out)
    finally:
        SeerDecoderLayerMixin.forward = fused


def _run(variant, steps, seq_len, profile, out):
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()  # (CPU: a smoke test of the script at a short length, 2 layers)
    model = SeerLlamaForCausalLM(SeerLlamaConfig(**{**SMOLLM2, **({} if cuda else dict(num_hidden_layers=2))}))
    model = model.float().to("cuda" if cuda else "cpu")
    data = [{"input_ids": torch.randint(0, SMOLLM2["vocab_size"], (seq_len,))} for _ in range(steps + 2)]
    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(output_dir=tmp, final_model_dir=os.path.join(tmp, "m"), max_steps=steps + (2 if profile else 0),
                  per_device_train_batch_size=1, bf16=cuda, use_cpu=not cuda, gradient_checkpointing=True, logging_steps=1000,
                  save_strategy="no", report_to="none", disable_tqdm=True, yarn_factor=4.0,
                  yarn_original_max_position_embeddings=8192, density=0.1, gate_loss_stride=4, warmup_steps=20,
                  max_grad_norm=1.0, dataloader_num_workers=0, save_final_model=False)
        kw.update(VARIANTS[variant])
        timer, prof = Timer(), Profile(steps + 1)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer = SeerFineTuneTrainer(model=model, args=FineTuneArguments(**kw), train_dataset=data,
                                      callbacks=[timer] + ([prof] if profile else []))
        trainer.train()
    d = [b - a for a, b in zip(timer.t, timer.t[1:])][:steps]
    res = {"variant": variant, "s_per_step": statistics.median(d[3:]), "steps": d,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, **prof.report}
    if "cprofile" in res:
        with open(os.path.join(out, f"{variant}_cprofile.txt"), "w") as f:
            f.write(res.pop("cprofile"))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", nargs="+", default=["stride-compile", "frozen-compile"], choices=tuple(VARIANTS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=32768)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for i, v in enumerate(args.variants):
        rows.append(run(v, args.steps, args.seq_len, i == 0, args.out))
        r = rows[-1]
        print(f"[host_profile] {v}: {r['s_per_step']:.3f} s/step, peak {r['peak_gib']:.1f} GiB", flush=True)
        write_envelope(os.path.join(args.out, "ft_host_profile.json"), "ft_host_profile", rows,
                       config=vars(args), model="SmolLM2-135M shape, random weights", complete=i == len(args.variants) - 1)
    tp = rows[0].get("torch_profiler")
    if tp:
        print(f"\nprofiled step of {rows[0]['variant']}: GPU busy {tp['gpu_busy_ms']:.1f} ms, "
              f"{tp['kernel_launches']} kernel launches, CPU op self time {tp['cpu_self_ms_total']:.1f} ms")
        for t in tp["cpu_top"][:30]:
            print(f"  {t['self_ms']:8.2f} ms {t['calls']:6d}  {t['name']}")
    print("\n| variant | s/step | peak GiB |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['s_per_step']:.3f} | {r['peak_gib']:.1f} |")
    print(json.dumps({r["variant"]: r["s_per_step"] for r in rows}))


if __name__ == "__main__":
    main()
