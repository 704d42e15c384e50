"""``seer_compile_pointwise`` and the fine-tuning trainer's ``compile_pointwise`` (CPU, the
``aot_eager`` backend: dynamo's graphs run by eager aten ops, so the plumbing is checked
without a compiler; the GPU timing run uses inductor).

The compiled pieces (each decoder layer's work before and after its attention, the gate's block
selection, the final norm, the LM loss) are five graphs shared by every layer, without graph breaks, under activation checkpointing and a sparse
prefill; loss, gradients and the selected blocks equal the eager model's; ``enable=False``
restores the eager functions; the trainer applies it after PEFT and refuses transformers'
whole-model ``torch_compile``.
"""
import pytest
import torch

from seer_attn.training.finetune_trainer import FineTuneArguments, SeerFineTuneTrainer

NATIVE = 256


def _sparse_model(make_tiny_model, layers=3):
    model = make_tiny_model(seed=0, layers=layers, max_position_embeddings=1024)
    model.set_seer_mode("sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.5)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_pieces_match_eager_without_graph_breaks(make_tiny_model):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(1, 257, (2, 512), generator=torch.Generator().manual_seed(0))
    eager = _sparse_model(make_tiny_model)
    ref_loss, ref_grads = _loss_and_grads(eager, ids)
    model = _sparse_model(make_tiny_model).seer_compile_pointwise(backend="aot_eager")
    for _ in range(2):  # the second step reuses the graphs (no recompiles)
        loss, grads = _loss_and_grads(model, ids)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    # the layer before and after its attention, the gate's block selection, the final norm and
    # the loss: one graph each, whatever the number of layers
    assert counters["stats"]["unique_graphs"] == 5, dict(counters["stats"])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert model.seer_density() is not None and model.seer_density().mean() < 0.9  # the prefill stayed sparse
    torch.testing.assert_close(model.seer_density(), eager.seer_density(), rtol=0, atol=0)  # the same blocks

    model.seer_compile_pointwise(enable=False)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert "_loss_function" not in model.__dict__
    assert all(layer.self_attn._seer_compile is None for layer in model.model.layers)
    loss, _ = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)


def test_enable_false_restores_a_custom_loss(make_tiny_model):
    model = _sparse_model(make_tiny_model, layers=1)

    def custom(logits, labels, vocab_size, **kw):
        return logits.float().mean()

    model.loss_function = custom
    model.seer_compile_pointwise(backend="aot_eager")
    assert model.loss_function is not custom
    model.seer_compile_pointwise(backend="aot_eager")  # twice: still one wrapper over the custom loss
    model.seer_compile_pointwise(enable=False)
    assert model.loss_function is custom


def test_trainer_compiles_after_peft_and_trains(tmp_path, make_tiny_model, packed_train_512):
    model = make_tiny_model(seed=0, max_position_embeddings=NATIVE)
    args = FineTuneArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1, logging_steps=1,
                             save_strategy="no", save_final_model=False, use_cpu=True, seed=0, disable_tqdm=True,
                             report_to="none", dataloader_num_workers=0, yarn_factor=2.0, density=0.5,
                             lora_r=4, compile_pointwise=True, compile_pointwise_backend="aot_eager",
                             lora_base_dir=str(tmp_path / "base"))
    trainer = SeerFineTuneTrainer(model=model, args=args, train_dataset=packed_train_512)
    seer = trainer.seer_model
    assert all(layer.self_attn._seer_compile == {"backend": "aot_eager"} for layer in seer.model.layers)
    mlp = seer.model.layers[0].mlp
    assert "forward" in mlp.__dict__ and type(mlp.gate_proj).__module__.startswith("peft")
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)


@pytest.mark.parametrize("field, value", [("torch_compile", True), ("torch_compile_backend", "inductor"),
                                          ("torch_compile_mode", "max-autotune")])
def test_whole_model_compile_is_refused(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"{field}=.*use compile_pointwise=True") as err:
        FineTuneArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **{field: value})
    assert "\n" not in str(err.value)
