"""``seer-attn push`` (hub_cards/push.py) and ``--push-to-hub``: bad repo ids and offline mode
stop before anything is uploaded, the folder is validated (card, no pickles, loads where
seer_attn is absent) before any Hub call, network failures end in one line, no token is shown;
``distill`` and ``finetune`` (full and LoRA) push what they trained with its envelopes."""
import json
import random
import shutil
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

import huggingface_hub
from seer_attn.hub_cards.cli import main
from seer_attn.hub_cards.export import ExportOptions, export
from seer_attn.hub_cards.push import push_folder, validate_folder
from seer_attn.training.finetune import FineTuneConfig
from seer_attn.training.results import envelope, write_json

TOKEN = "hf_NotARealTokenButSecret0123456789"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny, hubfs):
    """A full and a gates-only export of a tiny model; the gates-only base, by Hub id, is in
    the Hugging Face cache ``ROOT/hf-cache``."""
    root = tmp_path_factory.mktemp("push-folders")
    stock = tiny.stock()
    stock.save_pretrained(root / "base")
    hubfs.put(root / "hf-cache", "seer-test/tiny-base", hubfs.files(root / "base"), "1" * 40)
    seer = tiny.seer(stock)
    export(ExportOptions(output=str(root / "full"), model=str(root / "base")), model=seer)
    export(ExportOptions(output=str(root / "gates"), model=str(root / "base"), gates_only=True,
                         base="seer-test/tiny-base", base_revision="1" * 40), model=seer)
    return root


@pytest.fixture
def hub_calls(monkeypatch):
    """Records every Hub write (create_repo, create_branch, upload_folder) instead of making it."""
    calls = []

    def record(name, result):
        def call(*args, **kwargs):
            calls.append((name, args, kwargs))
            return result
        return call
    monkeypatch.setattr(huggingface_hub, "create_repo", record("create_repo", SimpleNamespace(
        url="https://huggingface.co/me/tiny")))
    monkeypatch.setattr(huggingface_hub, "create_branch", record("create_branch", None))
    monkeypatch.setattr(huggingface_hub, "upload_folder", record("upload_folder", SimpleNamespace(
        pr_url="https://huggingface.co/me/tiny/discussions/1")))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return calls


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as ex:
        main(argv)
    out = capsys.readouterr()
    return ex.value.code, out.out + out.err


def test_offline_push_fails_with_one_message_and_uploads_nothing(folders, hub_calls, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, text = _cli(["push", str(folders / "full"), "--repo-id", "me/tiny"], capsys)
    assert code == 2 and hub_calls == []
    assert text.strip().count("\n") == 0 and "offline mode" in text and "nothing was uploaded" in text, text
    assert TOKEN not in text


@pytest.mark.parametrize("repo_id", ["a/b/c", "bad..id", "x--y", "-lead", "name.git", "spaces here", ""],
                         ids=["three-parts", "double-dot", "double-dash", "leading-dash", "dot-git", "space", "empty"])
def test_bad_repo_ids_are_refused_before_anything(repo_id, hub_calls, tmp_path, capsys):
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        push_folder(str(tmp_path / "no-such-folder"), repo_id)  # the id is refused before the folder is looked at
    code, text = _cli(["push", str(tmp_path / "no-such-folder"), f"--repo-id={repo_id}"], capsys)
    assert code == 2 and "not a valid Hub repo id" in text and hub_calls == []


def test_an_unreachable_hub_fails_in_one_line(folders, hub_calls, monkeypatch):
    dead = huggingface_hub.HfApi(endpoint="http://127.0.0.1:9")  # nothing listens there: no network
    monkeypatch.setattr(huggingface_hub, "create_repo", dead.create_repo)
    with pytest.raises(OSError) as err:
        push_folder(str(folders / "gates"), "me/tiny", load_check=False)
    msg = str(err.value)
    assert msg.startswith("creating the repo me/tiny failed") and "\n" not in msg and TOKEN not in msg, msg
    assert hub_calls == []  # no upload after the failure


def test_validated_then_uploaded_in_one_commit(folders, hub_calls, capsys):
    url = push_folder(str(folders / "gates"), "me/tiny", revision="v1", commit_message="gates", load_check=False)
    assert url == "https://huggingface.co/me/tiny/tree/v1"
    assert [c[0] for c in hub_calls] == ["create_repo", "create_branch", "upload_folder"]
    up = hub_calls[-1][2]
    assert (up["repo_id"], up["folder_path"], up["revision"], up["commit_message"], up["create_pr"]) == \
        ("me/tiny", str(folders / "gates"), "v1", "gates", False)
    hub_calls.clear()
    code, text = 0, ""
    try:
        main(["push", str(folders / "full"), "--repo-id", "me/tiny", "--create-pr"])
    except SystemExit as ex:
        code = ex.code
    text = capsys.readouterr().out
    assert code in (0, None) and "https://huggingface.co/me/tiny/discussions/1" in text and TOKEN not in text
    assert [c[0] for c in hub_calls] == ["create_repo", "upload_folder"] and hub_calls[-1][2]["create_pr"] is True


def _broken(folders, tmp_path, how):
    dst = tmp_path / "folder"
    shutil.copytree(folders / ("gates" if how == "local-base" else "full"), dst)
    if how == "pickle":
        (dst / "weights.bin").write_bytes(b"\x80\x04")
    elif how == "dead-link":
        (dst / "README.md").write_text((dst / "README.md").read_text() + "\n![plot](missing.png)\n")
    elif how == "bad-yaml":
        (dst / "README.md").write_text("---\nlicense: [unclosed\n---\n# card\n")
    elif how == "no-card":
        (dst / "README.md").unlink()
    elif how == "broken-code":
        (dst / "gate.py").unlink()
    elif how == "local-base":
        cfg = json.loads((dst / "config.json").read_text())
        cfg["seer_base_model"], cfg["seer_base_revision"] = str(folders / "base"), None
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("how, match", [
    ("pickle", "pickled files"), ("dead-link", "links files the folder lacks"), ("bad-yaml", "does not parse"),
    ("no-card", "no model card"), ("broken-code", "does not load with trust_remote_code=True"),
    ("local-base", "local base .* which others cannot load"),
], ids=["pickle", "dead-link", "bad-yaml", "no-card", "broken-code", "local-base"])
def test_invalid_folders_are_refused_before_any_hub_call(folders, hub_calls, tmp_path, how, match):
    with pytest.raises(ValueError, match=match):
        push_folder(str(_broken(folders, tmp_path, how)), "me/tiny")
    assert hub_calls == []


@pytest.mark.parametrize("kind", ["full", "gates"])
def test_exported_folders_validate_and_load_without_the_package(folders, monkeypatch, kind):
    monkeypatch.setenv("HF_HUB_CACHE", str(folders / "hf-cache"))  # where the gates-only base is
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    meta = validate_folder(str(folders / kind))  # includes the load in a process without seer_attn
    assert meta["library_name"] == "transformers" and "seer-attention" in meta["tags"]


@pytest.mark.parametrize("problem, match", [
    ("offline", "offline mode"), ("no-token", "no Hugging Face token"), ("upload-folder-exists", "exists"),
    ("local-base", "others cannot load a local path"),
], ids=["offline", "no-token", "upload-folder-exists", "local-base"])
def test_push_to_hub_is_checked_before_training(folders, hub_calls, monkeypatch, tmp_path, capsys, problem, match):
    out = tmp_path / "out"
    extra = []
    if problem == "local-base":
        extra = ["--push-gates-only", "--model", str(folders / "base")]
    elif problem == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif problem == "no-token":
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    else:
        (out / "hub").mkdir(parents=True)
        (out / "hub" / "old.txt").write_text("x")
    code, text = _cli(["distill", "--push-to-hub", "me/tiny", "--output", str(out), "--steps", "1", *extra], capsys)
    assert code == 2 and match in text and hub_calls == [] and TOKEN not in text, text
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == ["hub"]  # training never started


def test_push_to_hub_refuses_a_bad_repo_id_at_parse_time(tmp_path, capsys):
    code, text = _cli(["distill", "--push-to-hub", "x--y", "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and "argument --push-to-hub" in text and "not a valid Hub repo id" in text
    assert not (tmp_path / "out").exists()


def test_push_to_hub_exports_the_trained_folder_with_its_envelope_and_pushes_it(folders, hub_calls, committed,
                                                                                tmp_path, capsys):
    """What --push-to-hub does after training, given what ``distill`` returns (its model
    folder and results envelope: here a tiny model's folder and the shipped gates' envelope)."""
    from seer_attn.hub_cards.cli import run_then_push
    args = SimpleNamespace(output=str(tmp_path / "out"), push_to_hub="me/tiny", push_gates_only=False,
                           push_private=True, model="seer-test/tiny-base")
    res = {"model_dir": str(folders / "full"), "summary_path": str(committed.distill), "model": args.model}
    assert run_then_push(lambda a: res, args) is res
    hub = tmp_path / "out" / "hub"
    assert [c[0] for c in hub_calls] == ["create_repo", "upload_folder"]
    assert hub_calls[0][2]["private"] is True and hub_calls[1][2]["folder_path"] == str(hub)
    card = (hub / "README.md").read_text()
    assert "me/tiny" in card and "1000 optimizer steps of 2048 tokens" in card
    assert (hub / "results" / committed.distill.name).is_file() and (hub / "model.safetensors").is_file()
    assert "https://huggingface.co/me/tiny" in capsys.readouterr().out


def test_push_to_hub_ships_the_calibration_distill_wrote(folders, hub_calls, committed, tmp_path):
    """``distill --calibrate-density`` returns ``calibration_path``: the pushed folder's config
    and card carry that setting."""
    from seer_attn.eval.calibrate_run import gates_sha256
    from seer_attn.hub_cards.cli import run_then_push
    from seer_attn.modeling_seer.conversion import load_seer_model
    from seer_attn.training.results import write_envelope
    keep = dict(seer_keep_diagonal=True, seer_keep_sink=False, seer_keep_local=0, seer_dense_last_rows=2,
                seer_dense_layers=0)
    cal = write_envelope(tmp_path / "calibration.json", "calibration", [{"pass": 1, "param": 0.5, "density": 0.2}],
                         config={"rel_tol": 0.02}, settings={"seer_mode": "sparse", "seer_selector": "gate",
                                                             "seer_sparsity_method": "coverage", "seer_coverage": 0.5},
                         keep=keep, method="coverage", param=0.5, target_density=0.2, density=0.2, within_tol=True,
                         gates_sha256=gates_sha256(load_seer_model(str(folders / "full"))), ppl=[],
                         sample={"data": "the bundled training corpus", "windows": 4, "max_length": 128})
    assert cal["kind"] == "calibration"
    args = SimpleNamespace(output=str(tmp_path / "out"), push_to_hub="me/tiny", push_gates_only=False,
                           push_private=False, model="seer-test/tiny-base")
    res = {"model_dir": str(folders / "full"), "summary_path": str(committed.distill), "model": args.model,
           "calibration_path": str(tmp_path / "calibration.json")}
    run_then_push(lambda a: res, args)
    hub = tmp_path / "out" / "hub"
    assert json.loads((hub / "config.json").read_text())["seer_coverage"] == 0.5
    assert "Calibrated (`seer-attn calibrate`" in (hub / "README.md").read_text()
    assert (hub / "results" / "calibration.json").is_file()


# -- finetune --push-to-hub ------------------------------------------------------------------

@pytest.fixture(scope="module")
def finetune_inputs(tmp_path_factory, tiny):
    """A stock tiny Llama with a byte tokenizer (native context 128) and a jsonl of two sources."""
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("finetune-inputs")
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**tiny.config, "vocab_size": 257, "max_position_embeddings": 128, "bos_token_id": 0,
                         "eos_token_id": 0, "pad_token_id": 0})
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    tiny.tokenizer().save_pretrained(root / "base")
    rng = random.Random(0)
    words = "the of and a to in is was that for it with as his on be at by".split()
    with open(root / "data.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(300)), "source": f"s{i % 2}"}) + "\n")
    return root


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_finetune_push_to_hub_exports_the_fine_tuned_model_with_its_envelopes(finetune_inputs, hub_calls, tmp_path,
                                                                              capsys, lora):
    """``seer-attn finetune --push-to-hub``: after training (YaRN 2x, sparse at nz_ratio 0.5)
    and the closing table, the whole fine-tuned model (a LoRA adapter merged into its base)
    is exported with the run's two envelopes and pushed; the pushed weights are the run's."""
    from seer_attn.modeling_seer.conversion import load_seer_model
    from seer_attn.training.finetune import load_finetuned
    root, out = finetune_inputs, tmp_path / "out"
    argv = ["finetune", "--model", str(root / "base"), "--data", str(root / "data.jsonl"), "--eval-data",
            str(root / "data.jsonl"), "--eval-windows", "1", "--seq-len", "256", "--yarn-factor", "2", "--density",
            "0.5", "--steps", "1", "--warmup-steps", "0", "--cpu", "--no-progress", "--output", str(out),
            "--push-to-hub", "me/tiny", "--push-private"] + (["--lora-r", "4", "--lora-targets", "q_proj", "v_proj"]
                                                               if lora else [])
    assert main(argv) == 0
    assert "https://huggingface.co/me/tiny" in capsys.readouterr().out
    hub = out / "hub"
    assert [c[0] for c in hub_calls] == ["create_repo", "upload_folder"] and hub_calls[0][2]["private"] is True
    assert hub_calls[1][2]["folder_path"] == str(hub)
    assert (hub / "model.safetensors").is_file() and not (hub / "adapter_config.json").exists()
    summary = json.loads((out / "finetune_summary.json").read_text())
    evaluation = json.loads((out / "finetune_eval.json").read_text())
    for name in ("finetune_summary.json", "finetune_eval.json"):
        assert (hub / "results" / name).read_text() == (out / name).read_text()

    card = (hub / "README.md").read_text()
    assert "me/tiny" in card and "fine-tuned weights and the gates" in card and "base weights, unchanged" not in card
    assert "# tiny: base fine-tuned with SeerAttention" in card and "dense mode gives the base model's" not in card
    assert "1 optimizer step of 256 tokens (batch 1); YaRN context extension by 2x over the original 128 " \
           "positions; block-sparse attention at nz_ratio=0.5" in card
    assert ("LoRA of rank 4 on `q_proj`, `v_proj`, merged into the weights" in card) == lora
    assert (f"final logged loss {summary['final_loss']:.3f} (LM loss {summary['final_lm_loss']:.3f}, gate loss "
            f"{summary['final_gate_loss']:.3f}" in card)
    for r in evaluation["rows"]:
        assert f"| {r['setting']} | " in card and f"| {r['ppl']:.3f} |" in card
    meta = huggingface_hub.metadata_load(hub / "README.md")
    _, results = huggingface_hub.repocard_data.model_index_to_eval_results(meta["model-index"])
    assert sorted(r.metric_value for r in results) == sorted(round(r["ppl"], 4) for r in evaluation["rows"])

    x = torch.randint(0, 257, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pushed = load_seer_model(str(hub))(x).logits
        trained = load_finetuned(out / "model")(x).logits
    assert torch.equal(pushed, trained), (pushed - trained).abs().max()


def test_finetune_pushes_the_whole_model_only(finetune_inputs, hub_calls, tmp_path, capsys):
    """``--push-gates-only`` is distill's: fine-tuning changes the weights, and export refuses a
    gates-only folder of a fine-tuning run before any model loads."""
    code, text = _cli(["finetune", "--push-to-hub", "me/tiny", "--push-gates-only", "--output",
                       str(tmp_path / "out")], capsys)
    assert code == 2 and "unrecognized arguments: --push-gates-only" in text and hub_calls == []
    assert not (tmp_path / "out").exists()
    run = write_json(tmp_path / "finetune_summary.json", envelope("finetune", [], config=asdict(FineTuneConfig())))
    with pytest.raises(ValueError, match="is a fine-tuning run: the fine-tuned weights are not the base's"):
        export(ExportOptions(output=str(tmp_path / "g"), model=str(tmp_path / "never-loaded"), gates_only=True,
                             results=[run]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune_summary.json"]
