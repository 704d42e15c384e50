"""Worker of test_finetune_distributed.py (not a test module): fine-tune a tiny model with
SeerFineTuneTrainer (YaRN, density 0.5, the gate loss on 1 layer in 2, activation
checkpointing), under torchrun (gloo on CPU) or in one process, and save this rank's final
weights. Usage: python ddp_finetune_worker.py OUT_DIR PER_DEVICE_BATCH STEPS"""
import os
import sys

import torch
from datasets import Dataset

from seer_attn.modeling_seer import SeerLlamaConfig, SeerLlamaForCausalLM
from seer_attn.training.finetune_trainer import FineTuneArguments, SeerFineTuneTrainer
from seer_attn.training.trainer import CHECKPOINTING_ARG


def main(out, per_device_batch, steps):
    torch.manual_seed(0)
    cfg = SeerLlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          initializer_range=0.3, seer_gate_hidden_size=32, tie_word_embeddings=False)
    model = SeerLlamaForCausalLM(cfg)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(out, "init.pt"))
    g = torch.Generator().manual_seed(1)
    data = Dataset.from_dict({"input_ids": torch.randint(1, 257, (64, 256), generator=g).tolist()})
    args = FineTuneArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=per_device_batch,
                             learning_rate=1e-3, warmup_steps=1, logging_steps=steps, save_strategy="no",
                             report_to="none", use_cpu=True, seed=0, data_seed=0, save_final_model=False,
                             dataloader_num_workers=0, ddp_backend="gloo" if "RANK" in os.environ else None,
                             yarn_factor=2.0, density=0.5, gate_loss_stride=2, **{CHECKPOINTING_ARG: True})
    SeerFineTuneTrainer(model=model, args=args, train_dataset=data).train()
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
               os.path.join(out, f"weights_world{world}_rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
