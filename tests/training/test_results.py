"""seer_attn.training.results: the provenance block and the results envelope."""
import json
import os
import re
import subprocess
from dataclasses import dataclass

import pytest

from seer_attn.training import results

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _head():
    return subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def test_envelope_has_every_field(monkeypatch):
    monkeypatch.delenv(results.COMMIT_ENV, raising=False)
    env = results.envelope("unit", [{"a": (1, 2)}], config={"seq_len": 2048}, model="some/model",
                           command=["seer-attn", "x"], extra_field=3)
    assert list(env)[:6] == ["schema_version", "kind", "complete", "provenance", "config", "rows"]
    assert env["schema_version"] == results.SCHEMA_VERSION and env["kind"] == "unit" and env["complete"] is True
    prov = env["provenance"]
    assert prov["model"] == "some/model" and prov["command"] == ["seer-attn", "x"] and prov["gpu"]
    assert re.fullmatch(r"[0-9a-f]{40}", prov["commit"]) and prov["commit"] == results._AT_START[0]
    assert prov.get("commit_at_write", prov["commit"]) == _head()  # HEAD may move while the suite runs
    assert isinstance(prov["commit_dirty"], bool)
    assert {"python", "torch", "transformers"} <= set(prov["versions"])
    assert env["rows"] == [{"a": [1, 2]}] and env["config"] == {"seq_len": 2048} and env["extra_field"] == 3


def test_environment_names_the_commit_over_a_stale_git(monkeypatch):
    # a GPU copy of the tree sat on an old checkout and reported that checkout's commit
    monkeypatch.setenv(results.COMMIT_ENV, "f" * 40)
    monkeypatch.setenv(results.DIRTY_ENV, "0")
    assert results.git_state() == ("f" * 40, False)
    monkeypatch.setenv(results.DIRTY_ENV, "1")
    assert results.git_state() == ("f" * 40, True)
    monkeypatch.delenv(results.DIRTY_ENV)
    assert results.git_state() == ("f" * 40, None)


def test_no_git_and_no_environment_guesses_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv(results.COMMIT_ENV, raising=False)
    monkeypatch.setattr(results, "_SRC", str(tmp_path))  # not a git checkout
    assert results.git_state() == (None, None)


def test_envelope_refuses_bad_kind_and_clashing_fields():
    with pytest.raises(ValueError, match="kind=''"):
        results.envelope("", [])
    with pytest.raises(ValueError, match=r"extra fields \['provenance', 'schema_version'\]"):
        results.envelope("x", [], provenance=1, schema_version=2)


def test_to_jsonable_dataclasses_and_objects():
    @dataclass
    class Cfg:
        a: tuple = (1, 2)

    out = results.to_jsonable({"cfg": Cfg(), "dtype": object.__new__(type("D", (), {"__str__": lambda s: "d"}))})
    assert out == {"cfg": {"a": [1, 2]}, "dtype": "d"}


def test_write_is_atomic_and_complete_flag_kept(tmp_path):
    path = tmp_path / "sub" / "r.json"
    results.write_envelope(path, "x", [1], complete=False)
    data = json.loads(path.read_text())
    assert data["complete"] is False and data["rows"] == [1]
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left behind


def test_a_commit_during_the_run_keeps_the_commit_the_run_loaded(monkeypatch):
    """A long run whose working tree gets a new commit before it writes reports the commit its
    code came from (read at import), and names the later HEAD apart."""
    monkeypatch.delenv(results.COMMIT_ENV, raising=False)
    head = _head()
    monkeypatch.setattr(results, "_AT_START", ("a" * 40, False))
    prov = results.provenance("m", command=["x"])
    assert prov["commit"] == "a" * 40 and prov["commit_dirty"] is False and prov["commit_at_write"] == head
    monkeypatch.setattr(results, "_AT_START", (head, False))
    prov = results.provenance("m", command=["x"])
    assert prov["commit"] == head and "commit_at_write" not in prov
