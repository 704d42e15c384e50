"""bench_decode on a CPU: --help, the one-line no-GPU exit, option errors, the envelope and CSVs
it writes (from fake rows), and its end-to-end machinery (a pre-filled preallocated KV cache
with its pooled-K cache) on a tiny model: with every block selected, sparse decode gives the
dense logits; at a lower share it reads that share."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from seer_attn.eval import bench_decode


def test_help_and_no_gpu(monkeypatch, capsys, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "seer_attn.eval.bench_decode", "--help"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0 and "--e2e" in r.stdout and "--share" in r.stdout, r.stderr
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        bench_decode.main(["--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("error: needs a CUDA GPU, and torch sees none")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--e2e", "4x1000"], "'4x1000': expected a batch >= 1 and a multiple of 64 tokens"),
    (["--e2e", "four"], "'four' is not BATCHxTOKENS"),
    (["--share", "0"], "argument --share: invalid value '0': expected a number 0 < x <= 1"),
    (["--steps", "61"], "argument --steps: invalid value '61': expected at most 60"),
    (["--lengths", "100"], "argument --lengths: invalid value '100': expected an integer >= 128"),
])
def test_bad_options(extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_decode.main(extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err


def test_config_checks_and_defaults():
    cfg = bench_decode.DecodeBenchConfig()
    assert cfg.out.startswith("seer_outputs/") and cfg.e2e == ((4, 131072), (16, 32768))
    assert bench_decode.DecodeBenchConfig(e2e=["2x4096", (1, 8192)]).e2e == ((2, 4096), (1, 8192))
    for kw, message in [(dict(e2e=["4x100"]), r"e2e\[0\]='4x100' is invalid: '4x100': expected a batch >= 1"),
                        (dict(steps=61), r"steps=61 is invalid: expected at most 60"),
                        (dict(share=1.5), r"share=1.5 is invalid: expected a number 0 < x <= 1"),
                        (dict(lengths=()), r"lengths=\(\) is invalid: expected at least one value")]:
        with pytest.raises(ValueError, match=message):
            bench_decode.DecodeBenchConfig(**kw)
    with pytest.raises(TypeError, match="run_decode_bench takes a DecodeBenchConfig, got dict"):
        bench_decode.run_decode_bench({"lengths": (4096,)})


def test_json_is_an_envelope(tmp_path, check_envelope):
    config = bench_decode.DecodeBenchConfig(out=str(tmp_path), e2e=("4x131072",))
    rows = [{"B": 1, "S": 32768, "sdpa_flash": 0.058, "ours_sparse": 0.01}]
    e2e = [{"B": 4, "T": 131072, "dense_s_per_token": 0.03, "sparse_s_per_token": 0.01}]
    bench_decode.write_results(config, rows, e2e, [{"B": 1, "S": 32768, "all_blocks_vs_sdpa_flash": 1e-3}], [],
                               "cpu")
    saved = check_envelope(json.loads((tmp_path / "decode.json").read_text()), "decode")
    assert saved["rows"] == rows and saved["e2e"] == e2e and saved["config"]["e2e"] == [[4, 131072]]
    assert bench_decode.DecodeBenchConfig(**saved["config"]) == config  # the envelope rebuilds the config
    assert saved["resolved"]["shape"] == {"HQ": 32, "H": 8, "D": 128, "dtype": "bf16"}
    with open(tmp_path / "decode.csv") as f:
        assert next(csv.DictReader(f))["T"] == "32768"
    assert (tmp_path / "decode_e2e.csv").is_file()


def test_gate_step_selects_the_share_on_cpu():
    """The timed per-layer work (gate logits, top-k; eager and graph-mode) runs on any device and keeps the share:
    ceil(0.1 * 64) of the 64 blocks of a 4096-slot cache, the current block (63) among them."""
    step, per_layer, graph_select = bench_decode.gate_step(2, 4096, 0.1, seed=0, device="cpu")
    for fn in (step, per_layer, graph_select):
        idx, cnt = fn()
        assert cnt.tolist() == [[7] * 8] * 2
        assert all(63 in idx[b, h, :7].tolist() and 0 in idx[b, h, :7].tolist() for b in range(2) for h in range(8))


def test_gate_step_with_the_prior_keeps_the_share_and_changes_the_choice_on_cpu():
    """With the mean-pooled prior mixed in (its torch reference on the CPU), the per-layer work still
    keeps ceil(0.1 * 64) blocks with the sink and the current block, and the prior moves the choice:
    at weight 1 the gate's random logits no longer decide it."""
    _, gate_only, graph_only = bench_decode.gate_step(2, 4096, 0.1, seed=0, device="cpu")
    _, with_prior, graph_prior = bench_decode.gate_step(2, 4096, 0.1, seed=0, device="cpu", prior=1.0)
    (i0, _), (i1, c1) = gate_only(), with_prior()
    for eager, graph in ((gate_only, graph_only), (with_prior, graph_prior)):  # the same kept sets
        (ie, ce), (ig, cg) = eager(), graph()
        assert torch.equal(ce, cg)
        assert torch.equal(ie[..., :7].sort(-1).values, ig[..., :7].long())
    assert c1.tolist() == [[7] * 8] * 2
    assert all(63 in i1[b, h, :7].tolist() and 0 in i1[b, h, :7].tolist() for b in range(2) for h in range(8))
    assert any(set(i0[b, h, :7].tolist()) != set(i1[b, h, :7].tolist()) for b in range(2) for h in range(8))


def _tiny_decode_model():
    from seer_attn.modeling_seer import SeerLlamaConfig, SeerLlamaForCausalLM
    cfg = SeerLlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          seer_gate_hidden_size=32, seer_decode_gate=True, seer_decode_method="share")
    torch.manual_seed(0)
    return SeerLlamaForCausalLM(cfg).eval()


@torch.no_grad()
def test_end_to_end_machinery_on_a_tiny_model():
    m = _tiny_decode_model()
    B, T = 2, 640
    cache, state = bench_decode.filled_cache(m, B, T, 8)
    assert state.length == T and state.gate_keys(1).shape[:3] == (B, 2, T // 64)
    _, dense = bench_decode.decode_run(m, cache, B, T, 2, 1)
    m.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_share=1.0)
    state.rewind(T)
    _, every = bench_decode.decode_run(m, cache, B, T, 1, 0)
    torch.testing.assert_close(every, dense, atol=1e-5, rtol=1e-5)
    m.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_share=0.2)
    state.rewind(T)
    state.reset_statistics()
    _, sparse = bench_decode.decode_run(m, cache, B, T, 2, 1)
    assert (sparse - dense).abs().max() > 1e-3
    assert torch.allclose(m.seer_decode_density(), torch.full((B,), 3 / 11))  # ceil(0.2 * 11) of 11 blocks


@torch.no_grad()
def test_graphed_end_to_end_machinery_on_a_tiny_model():
    """The CUDA-graph rows' setup, run eagerly: a filled static cache and its pooled-K cache;
    decode with every block selected gives the stock dense attention's tokens over the same
    cache, and share 0.2 reads that share."""
    from seer_attn.modeling_seer.decode_graph import GraphDecoder
    m = _tiny_decode_model()
    B, T = 2, 640
    cache, state = bench_decode.static_filled(m, B, T, 8)
    assert int(cache.get_seq_length()) == T and state.gate_keys(1).shape[:3] == (B, 2, T // 64)

    def tokens(**mode):
        m.set_seer_mode("dense", **mode)
        for layer in cache.layers:
            layer.cumulative_length.fill_(T)
        mask = torch.zeros(B, 1, 1, T + 8, dtype=torch.bool)
        mask[..., :T] = True
        dec = GraphDecoder(m, cache, torch.tensor([[5], [7]]), torch.full((B, 1), T), T, mask)
        out = []
        for _ in range(4):
            dec.step(cuda_graph=False)
            out.append(dec.ids.clone())
        return torch.cat(out, 1)
    dense = tokens(seer_decode_sparsity=False)
    assert torch.equal(tokens(seer_decode_sparsity=True, seer_decode_share=1.0), dense)
    tokens(seer_decode_sparsity=True, seer_decode_share=0.2)
    assert torch.allclose(m.seer_decode_density(), torch.full((B,), 3 / 11))  # ceil(0.2 * 11) of 11 blocks


@torch.no_grad()
def test_shared_kv_caches_are_one_buffer_with_own_lengths():
    """``--shared-kv``: every layer's keys/values are layer 0's storage (both cache kinds), each
    layer counts its own length, and decode over it runs: every block selected equals dense."""
    m = _tiny_decode_model()
    B, T = 2, 640
    cache, state = bench_decode.filled_cache(m, B, T, 8, shared=True)
    ptrs = {(layer.buf_k.data_ptr(), layer.buf_v.data_ptr()) for layer in cache.layers}
    assert len(ptrs) == 1 and state.length == T
    _, dense = bench_decode.decode_run(m, cache, B, T, 2, 1)
    assert [layer.n for layer in cache.layers] == [T + 3] * 2  # each layer appended its own 3 tokens
    m.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_share=1.0)
    state.rewind(T)
    _, every = bench_decode.decode_run(m, cache, B, T, 1, 0)
    torch.testing.assert_close(every, dense, atol=1e-5, rtol=1e-5)
    m.set_seer_mode("dense", seer_decode_sparsity=False)

    static, _ = bench_decode.static_filled(m, B, T, 8, shared=True)
    first = static.layers[0]
    assert all(layer.keys.data_ptr() == first.keys.data_ptr() and layer.values.data_ptr() == first.values.data_ptr()
               for layer in static.layers)
    assert len({id(layer.cumulative_length) for layer in static.layers}) == len(static.layers)
    first.cumulative_length.fill_(T + 1)
    assert int(static.layers[1].cumulative_length) == T
    unshared, _ = bench_decode.static_filled(m, B, T, 8)
    assert unshared.layers[0].keys.data_ptr() != unshared.layers[1].keys.data_ptr()
    from seer_attn.modeling_seer.decode_graph import GraphDecoder
    first.cumulative_length.fill_(T)
    m.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_share=0.2)
    mask = torch.zeros(B, 1, 1, T + 8, dtype=torch.bool)
    mask[..., :T] = True
    dec = GraphDecoder(m, static, torch.tensor([[5], [7]]), torch.full((B, 1), T), T, mask)
    for _ in range(2):
        dec.step(cuda_graph=False)
    assert [int(layer.cumulative_length) for layer in static.layers] == [T + 2] * 2
    assert torch.allclose(m.seer_decode_density(), torch.full((B,), 3 / 11))


def test_seer_attn_bench_decode_forwards_every_option(capsys, monkeypatch):
    from seer_attn.eval import cli
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench-decode", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: seer-attn bench-decode ") and "--e2e" in out
    seen = []
    monkeypatch.setattr(bench_decode, "main", seen.append)
    assert cli.main(["bench-decode", "--e2e", "4x131072", "--out", "x"]) == 0
    assert seen == [["--e2e", "4x131072", "--out", "x"]]
