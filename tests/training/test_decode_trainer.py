"""GateDistillationTrainer with decode gates (``seer_decode_gate=True``): their parameters
count as gate parameters, train beside the prefill gates, and are saved in the gates file."""
import torch
from safetensors import safe_open

from seer_attn.modeling_seer.seer_layer import GATES_FILE
from seer_attn.training.trainer import GateDistillationTrainer, SeerTrainingArguments, is_gate_parameter


def test_decode_gates_are_gate_parameters():
    assert is_gate_parameter("model.layers.3.self_attn.attn_gate.decode_gate.q_weight")
    assert is_gate_parameter("model.layers.3.self_attn.attn_gate.decode_gate.k_weight")
    assert is_gate_parameter("model.layers.3.self_attn.attn_gate.k_weight")
    assert not is_gate_parameter("model.layers.3.self_attn.decode_gate.q_weight")  # not inside attn_gate
    assert not is_gate_parameter("model.layers.3.self_attn.attn_gate.decode_gate.bias")


def test_trainer_trains_and_saves_decode_gates(make_tiny_model, packed_train_512, tmp_path):
    model = make_tiny_model(seer_decode_gate=True, seer_decode_distill_rows=16)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args = SeerTrainingArguments(output_dir=str(tmp_path / "ckpt"), final_model_dir=str(tmp_path / "model"),
                                 max_steps=4, per_device_train_batch_size=1, logging_steps=2, warmup_steps=0,
                                 save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, report_to="none",
                                 dataloader_num_workers=0)
    GateDistillationTrainer(model=model, args=args, train_dataset=packed_train_512.select(range(4))).train()
    after = model.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all(".attn_gate." in k for k in moved)
    assert any(".decode_gate." in k for k in moved) and any(k.endswith("attn_gate.q_weight") for k in moved)
    with safe_open(str(tmp_path / "model" / GATES_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert {k for k in after if ".decode_gate." in k} <= keys
