"""Data-parallel fine-tuning on CPU: 2 processes (torchrun, gloo) vs one process with the same
global batch, the proof for training/accelerate/'s DDP config (as test_distributed.py is for
distillation, whose launch helpers it reuses). YaRN, density 0.5, activation checkpointing and
the gate loss on 1 layer in 2, which leaves some gates without a gradient at each step (the
trainer then has DDP look for unused parameters)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "ddp_finetune_worker.py")
STEPS = 6


def _launch_helpers():
    spec = importlib.util.spec_from_file_location("_distill_distributed", HERE / "test_distributed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._env, mod._free_port


def test_two_process_finetuning_matches_one_process(tmp_path):
    env, free_port = _launch_helpers()
    out = str(tmp_path)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", free_port(), WORKER, out, "2", str(STEPS)],
                         capture_output=True, text=True, env=env(), timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, WORKER, out, "4", str(STEPS)], capture_output=True, text=True, env=env(),
                         timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    r0, r1 = (torch.load(os.path.join(out, f"weights_world2_rank{r}.pt")) for r in (0, 1))
    single = torch.load(os.path.join(out, "weights_world1_rank0.pt"))
    init = torch.load(os.path.join(out, "init.pt"))
    assert r0.keys() == r1.keys() == single.keys() and any(".attn_gate." in k for k in r0)
    for k in r0:
        # DDP keeps replicas identical: the same all-reduced gradients, the same optimizer step
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
        # same global batch (2 x 2 vs 1 x 4, same sampler order): equal up to the order of the
        # gradient all-reduce sum (fp32 rounding over 6 Adam steps), as for distillation
        torch.testing.assert_close(r0[k], single[k], atol=1e-5, rtol=1e-4)
        if k.endswith(("weight", "q_weight", "k_weight")) and "norm" not in k:
            assert (r0[k] - init[k]).abs().max() > 1e-4, f"{k} did not train"
