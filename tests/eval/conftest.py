"""Fixtures of the eval tests: a small synthetic corpus, a BPE tokenizer trained on it, and a
tiny random SeerLlama (2 layers, hidden 64, 4 query / 2 KV heads), all offline and built
once per session; ``check_envelope``, the checks every results JSON must pass."""
import json
import os
import random
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
          "they you were her she there one all we their been has when who will more no if out so said what up its "
          "about into than them can only other new some could time these two may then do first any my now such "
          "like our over man me even most made after also did many before must through back years where much your "
          "way well down should because each just those people how too little state good very make world still "
          "own see men work long get here between both life being under never day same another know while last "
          "might us great old year off come since against go came right used take three").split()


def _prose(rng, n_chars):
    out, size = [], 0
    while size < n_chars:
        s = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 14)))
        s = s[0].upper() + s[1:] + rng.choice([".", ".", ",", ";", "!", "?"]) + (" " if rng.random() < 0.85 else "\n\n")
        out.append(s)
        size += len(s)
    return "".join(out)[:n_chars]


def _code(rng, n_chars):
    out, size, i = [], 0, 0
    while size < n_chars:
        a, b = rng.choice(_WORDS), rng.choice(_WORDS)
        s = (f"def {a}_{i}({b}, value={rng.randint(0, 99)}):\n    \"\"\"Return the {a} of {b}.\"\"\"\n"
             f"    if {b} is None:\n        return value\n    return {b} + {rng.randint(1, 9)}\n\n\n")
        out.append(s)
        size += len(s)
        i += 1
    return "".join(out)[:n_chars]


#: (id, source, kind, characters)
CORPUS_SPEC = [
    ("austen/novel", "austen", "prose", 9000),
    ("kjv/long", "kjv", "prose", 6000),
    ("kjv/short", "kjv", "prose", 1600),
    ("cpython311/mod.py", "cpython-stdlib", "code", 6000),
    ("kjv/tiny", "kjv", "prose", 120),
]


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread():
    """The tiny model's ops are too small to gain from threads, and on a busy 2-core machine
    OpenMP's spinning threads made these tests up to 10x slower; restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus_docs():
    rng = random.Random(1234)
    return [{"id": i, "source": s, "text": (_prose if k == "prose" else _code)(rng, n)} for i, s, k, n in CORPUS_SPEC]


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory, corpus_docs):
    path = tmp_path_factory.mktemp("corpus") / "eval.jsonl"
    with open(path, "w") as f:
        for d in corpus_docs:
            f.write(json.dumps(d) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_docs):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([d["text"] for d in corpus_docs], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _tiny_model(tokenizer):
    from seer_attn.modeling_seer import SeerLlamaConfig, SeerLlamaForCausalLM
    cfg = SeerLlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          seer_gate_hidden_size=32, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return SeerLlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def _session_model(tokenizer):
    return _tiny_model(tokenizer)


@pytest.fixture
def model(_session_model):
    """The session's tiny model; every ``seer_*`` option (mode, selection, keep rules) is put
    back afterwards, so no test sees another's settings."""
    from seer_attn.eval.baselines import preserved_seer_mode
    with preserved_seer_mode(_session_model):
        yield _session_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A saved tiny SeerLlama folder with its tokenizer (what ``seer-attn eval --model`` takes)."""
    path = tmp_path_factory.mktemp("tiny_seer")
    _tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _check_envelope(env, kind, complete=True):
    """``env`` (a results JSON, as read back) is an envelope of ``kind``
    (seer_attn.training.results) whose provenance names the commit of this checkout."""
    assert env["schema_version"] == 1 and env["kind"] == kind and env["complete"] is complete
    prov = env["provenance"]
    assert re.fullmatch(r"[0-9a-f]{40}", prov["commit"] or ""), prov["commit"]  # the tests run in the git checkout
    assert isinstance(prov["commit_dirty"], bool)
    assert prov["model"] and prov["gpu"] and prov["versions"]["torch"] and prov["versions"]["transformers"]
    assert isinstance(prov["command"], list) and prov["command"] and prov["created"]
    assert isinstance(env["config"], dict) and env["config"] and isinstance(env["rows"], list)
    return env


@pytest.fixture
def check_envelope():
    """The checks of every results JSON (:func:`_check_envelope`), as a function."""
    return _check_envelope
