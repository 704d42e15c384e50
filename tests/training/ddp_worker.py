"""Worker of test_distributed.py (not a test module): distil the gates of a tiny model with
GateDistillationTrainer, under torchrun (gloo on CPU) or in one process, and save the final
gates of this rank. Usage: python ddp_worker.py OUT_DIR PER_DEVICE_BATCH STEPS"""
import os
import sys

import torch
from datasets import Dataset

from seer_attn.modeling_seer import SeerLlamaConfig, SeerLlamaForCausalLM
from seer_attn.training.trainer import GateDistillationTrainer, SeerTrainingArguments


def main(out, per_device_batch, steps):
    torch.manual_seed(0)
    cfg = SeerLlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          initializer_range=0.3, seer_gate_hidden_size=32, tie_word_embeddings=False)
    model = SeerLlamaForCausalLM(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save({k: v.detach().clone() for k, v in model.gate_state_dict().items()},
                   os.path.join(out, "gates_init.pt"))
    g = torch.Generator().manual_seed(1)
    data = Dataset.from_dict({"input_ids": torch.randint(0, 257, (64, 256), generator=g).tolist()})
    args = SeerTrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=per_device_batch,
                                 warmup_steps=2, logging_steps=steps, save_strategy="no", report_to="none",
                                 use_cpu=True, seed=0, data_seed=0, save_final_model=False,
                                 dataloader_num_workers=0, ddp_backend="gloo" if "RANK" in os.environ else None)
    GateDistillationTrainer(model=model, args=args, train_dataset=data).train()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.save({k: v.detach().clone() for k, v in model.gate_state_dict().items()},
               os.path.join(out, f"gates_world{world}_rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
