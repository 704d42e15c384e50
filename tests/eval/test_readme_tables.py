"""README.md's results tables are generated from the committed envelopes (seer_attn.eval.readme_tables):
the committed README is up to date (the CI check), a stale or hand-edited table fails the check,
a table follows its envelope, and results/ holds only envelopes the README cites."""
import json
import os
import re
import shutil

import pytest

from seer_attn.eval import readme_tables as rt

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(REPO, "results")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_readme_tables_are_up_to_date(capsys):
    """The CI check: every table of README.md is what its committed envelopes give."""
    assert rt.main(["--root", REPO, "--check"]) == 0, capsys.readouterr().err


@pytest.fixture
def clone(tmp_path):
    """README.md and results/ copied to a temporary root."""
    shutil.copy(os.path.join(REPO, "README.md"), tmp_path / "README.md")
    shutil.copytree(RESULTS, tmp_path / "results")
    return tmp_path


def test_a_hand_edited_table_fails_the_check_and_is_rewritten(clone, capsys):
    readme = clone / "README.md"
    committed = readme.read_text()
    edited = committed.replace("| 8k | 1.70 |", "| 8k | 1.60 |", 1)  # the H100 kernel table, typed over
    assert edited != committed
    readme.write_text(edited)
    assert rt.main(["--root", str(clone), "--check"]) == 1
    assert "out of date for tables ['kernels-h100']" in capsys.readouterr().err
    assert readme.read_text() == edited  # --check changes nothing
    assert rt.main(["--root", str(clone)]) == 0 and readme.read_text() == committed


def test_a_table_follows_its_envelope(clone):
    path = clone / "results" / "ttft" / "h100.json"
    env = json.loads(path.read_text())
    env["rows"][0]["seer_nz0.1"] = 0.9  # as if a new run had measured 0.9 s at 32k
    path.write_text(json.dumps(env))
    assert rt.main(["--root", str(clone), "--check"]) == 1
    assert rt.main(["--root", str(clone)]) == 0
    text = (clone / "README.md").read_text()
    assert "| 32k | 1.80 s | 1.41 s | 1.21 s | 0.90 s | 2.00× |" in text


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("<!-- table:ttft-h100 -->", "<!-- table:ttft-h999 -->"), "table:ttft-h999 names no table"),
    (lambda t: re.sub(r"<!-- table:ttft-h100 -->\n.*?<!-- /table -->\n", "", t, flags=re.DOTALL),
     "no marker for tables ['ttft-h100']"),
    (lambda t: t + "\n<!-- table:ttft-h100 -->\n", "markers but"),
], ids=["unknown-name", "missing-marker", "unclosed-marker"])
def test_bad_markers_are_errors(clone, capsys, edit, message):
    readme = clone / "README.md"
    readme.write_text(edit(readme.read_text()))
    assert rt.main(["--root", str(clone), "--check"]) == 2
    assert message in capsys.readouterr().err


def test_a_file_that_is_no_envelope_is_refused(clone, capsys):
    (clone / "results" / "ttft" / "h100.json").write_text(json.dumps({"meta": {}, "rows": []}))
    assert rt.main(["--root", str(clone), "--check"]) == 2
    assert "results/ttft/h100.json is not a results envelope" in capsys.readouterr().err


@pytest.mark.parametrize("x, text", [(1.7, "1.70"), (0.987, "0.99"), (25.053, "25.1"), (429.88, "430"),
                                     (0.209, "0.21"), (9.768, "9.77"), (None, "—")])
def test_three_significant_digits(x, text):
    assert rt.sig3(x) == text


# ----------------------------------------------------------------------------- results/

def _results_files():
    return sorted(os.path.relpath(os.path.join(d, f), REPO).replace(os.sep, "/")
                  for d, _, files in os.walk(RESULTS) for f in files if f != "README.md")


def test_results_holds_only_envelopes_the_readme_cites():
    readme = _read(os.path.join(REPO, "README.md"))
    files = _results_files()
    envelopes = [f for f in files if f.endswith(".json")]
    assert envelopes
    for path in envelopes:
        env = rt.load_envelope(REPO, path)
        assert env["schema_version"] == 1 and isinstance(env["rows"], list) and env["provenance"]["gpu"], path
        assert path in readme, f"{path} is not cited by README.md"
    stems = {os.path.splitext(p)[0] for p in envelopes}
    companions = [f for f in files if not f.endswith(".json")]
    assert all(os.path.splitext(f)[0] in stems for f in companions), companions  # a run's CSV / plot only


def test_every_results_path_the_docs_name_exists():
    docs = [os.path.join(REPO, "README.md"), os.path.join(RESULTS, "README.md"),
            os.path.join(REPO, "docs", "design.md"), os.path.join(REPO, "training", "gates", "README.md")]
    docs += [os.path.join(REPO, "docs", "experiments", f) for f in os.listdir(os.path.join(REPO, "docs", "experiments"))
             if f.endswith(".md")]
    for doc in docs:
        text = _read(doc)
        named = set(re.findall(r"(?<![\w/:])results/[\w./-]*\w", text))
        for path in named:  # a file of the history is written COMMIT:results/... and not checked
            assert os.path.exists(os.path.join(REPO, path)), f"{os.path.relpath(doc, REPO)} names {path}"


def test_the_results_index_lists_every_envelope():
    index = _read(os.path.join(RESULTS, "README.md"))
    listed = set(re.findall(r"^\| `([\w/.]+\.json)`", index, flags=re.MULTILINE))
    assert listed == {p[len("results/"):] for p in _results_files() if p.endswith(".json")}
