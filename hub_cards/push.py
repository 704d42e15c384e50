"""``seer-attn push``: upload an exported folder (``seer-attn export``) to the Hugging Face Hub.

    seer-attn push DIR --repo-id NAMESPACE/NAME [--private] [--revision BRANCH] [--create-pr]
                       [--commit-message TEXT]

In this order, stopping at the first problem with one line (exit code 2) and nothing uploaded:

1. the repo id is checked with huggingface_hub's own validator;
2. offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) refuses at once;
3. the folder: no pickled weights, a gates-only base named by Hub id (not a local path), a
   model card that ``ModelCard.load`` reads, whose metadata (``model-index`` included)
   parses, and whose links name files of the folder;
4. the folder loads with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``
   in a fresh process where this package cannot be imported, and gives finite logits (a
   gates-only folder fetches its base for that, as its users will);
5. a token must be available (``hf auth login`` or ``HF_TOKEN``); it is read by huggingface_hub
   only, never printed or written by us;
6. ``create_repo`` (``exist_ok``), the branch for ``--revision``, then ``upload_folder``: one
   commit, so a failed upload leaves no partial commit. The URL is printed.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

#: file suffixes of pickled weights, which exported folders never contain
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _repo_id_problem(repo_id):
    """Why huggingface_hub's validator refuses ``repo_id`` (one line), or None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        return str(err).strip().splitlines()[0]
    return None


def check_repo_id(repo_id, what="--repo-id"):
    """ValueError naming ``repo_id`` unless huggingface_hub's validator accepts it (None passes)."""
    problem = None if repo_id is None else _repo_id_problem(repo_id)
    if problem:
        raise ValueError(f"{what} {repo_id!r} is not a valid Hub repo id: {problem}")
    return repo_id


def repo_id_arg(text):
    """argparse ``type=`` check of a Hub repo id."""
    from seer_attn.training.cli_args import ArgValueError
    problem = _repo_id_problem(text)
    if problem:
        raise ArgValueError(f"invalid value {text!r}: not a valid Hub repo id ({problem})")
    return text


def check_online(what="push"):
    """OSError when the environment says offline (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    from seer_attn.modeling_seer.hub_utils import hub_offline
    if hub_offline():
        raise OSError(f"cannot {what}: offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); nothing was "
                      "uploaded")


def check_token():
    """OSError when huggingface_hub finds no token (the token itself is never shown)."""
    from huggingface_hub import get_token
    if not get_token():
        raise OSError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN; nothing was uploaded")


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def check_card(folder) -> dict:
    """The folder's model card parses (``ModelCard.load``, ``metadata_load``, its
    ``model-index`` through ``model_index_to_eval_results``) and every relative link names a
    file of the folder; returns the metadata. ValueError otherwise."""
    import yaml  # a dependency of huggingface_hub, which parses the card's header with it
    from huggingface_hub import ModelCard, metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no model card (README.md): make the folder with seer-attn export")
    try:
        card = ModelCard.load(path)
        meta = metadata_load(path) or {}
        if "model-index" in meta:
            model_index_to_eval_results(meta["model-index"])
    except (ValueError, KeyError, TypeError, yaml.YAMLError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path}: the model card does not parse: {reason}") from None
    missing = [link for link in _LINK.findall(card.text) if "://" not in link and not link.startswith("#")
               and not os.path.isfile(os.path.join(folder, link))]
    if missing:
        raise ValueError(f"{path} links files the folder lacks: {missing}")
    return meta


#: Script lines that make ``seer_attn`` unimportable (and import ``builtins``, ``sys``): what a
#: user without this package has. :func:`run_without_package` puts them first.
_NO_PACKAGE_PRELUDE = """
import builtins, sys
real_import = builtins.__import__
def guard(name, *a, **kw):
    if name.split(".")[0] == "seer_attn":
        raise ImportError("seer_attn must not be importable here")
    return real_import(name, *a, **kw)
builtins.__import__ = guard
"""

LOAD_CHECK = """import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
n = min(130, m.config.max_position_embeddings)
ids = torch.arange(n)[None] % m.config.vocab_size
with torch.no_grad():
    logits = m(ids).logits
assert torch.isfinite(logits).all(), "non-finite logits"
print("LOADED", type(m).__name__)
"""


def run_without_package(script, args, cwd, timeout=1800, **env):
    """Run the Python source ``script`` in a fresh interpreter where ``seer_attn`` cannot be
    imported (the prelude above comes first; ``sys`` is imported), with ``args`` as its
    ``sys.argv[1:]`` and ``cwd`` as its folder (the script is written there). The environment
    is this process's plus ``env``; PYTHONPATH stays, because dependencies such as gguf may be
    installed only there (the prelude, not the path, keeps the package out). Returns the
    ``subprocess.CompletedProcess`` with text output."""
    path = os.path.join(cwd, "no_package_run.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(_NO_PACKAGE_PRELUDE + script)
    return subprocess.run([sys.executable, path, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL)


def check_loads(folder, timeout=1800):
    """Load ``folder`` with ``trust_remote_code=True`` in a fresh Python process that cannot
    import this package and run one forward pass; ValueError with the error's last line."""
    with tempfile.TemporaryDirectory() as tmp:  # remote code is copied there, not into the user's cache
        r = run_without_package(LOAD_CHECK, [os.path.abspath(folder)], tmp, timeout, HF_MODULES_CACHE=tmp)
    if r.returncode != 0 or "LOADED" not in r.stdout:
        last = ([l for l in (r.stderr or r.stdout).strip().splitlines() if l.strip()] or ["no output"])[-1]
        raise ValueError(f"{folder} does not load with trust_remote_code=True where seer_attn is absent: {last}")


def validate_folder(folder, load=True) -> dict:
    """Steps 3-4 of the module docstring; returns the card's metadata."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no such folder: {folder}")
    pickles = [os.path.relpath(os.path.join(r, n), folder) for r, _, names in os.walk(folder) for n in names
               if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"{folder} holds pickled files {pickles}: export writes safetensors only")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder} has no config.json: make the folder with seer-attn export")
    check_base(folder)
    meta = check_card(folder)
    if load:
        check_loads(folder)
    return meta


def check_base(folder):
    """A gates-only folder must name its base by Hub id: a local path loads nowhere else."""
    import json

    from seer_attn.modeling_seer.hub_utils import resolve_source
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        base = json.load(f).get("seer_base_model")
    if not base:
        return
    try:
        local = resolve_source(base)[1]
    except FileNotFoundError:
        local = True
    if local:
        raise ValueError(f"{folder} is gates-only with the local base {base!r}, which others cannot load: export it "
                         "again with --base naming the base's Hub id")


def _hub_step(what, fn, *args, **kwargs):
    """A Hub call; any failure (network, permissions) becomes one OSError line."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - network and HTTP errors of several libraries, reported in one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise OSError(f"{what} failed: {reason}") from None


def push_folder(folder, repo_id, *, private=None, revision=None, create_pr=False, commit_message=None,
                load_check=True) -> str:
    """Upload ``folder`` to the Hub repo ``repo_id`` (module docstring); returns the URL."""
    from huggingface_hub import create_branch, create_repo, upload_folder
    check_repo_id(repo_id)
    check_online()
    validate_folder(folder, load=load_check)
    check_token()
    url = _hub_step(f"creating the repo {repo_id}", create_repo, repo_id, private=private, exist_ok=True)
    if revision and not create_pr:
        _hub_step(f"creating the branch {revision}", create_branch, repo_id, branch=revision, exist_ok=True)
    info = _hub_step(f"uploading {folder} to {repo_id}", upload_folder, repo_id=repo_id, folder_path=folder,
                     revision=revision, create_pr=create_pr,
                     commit_message=commit_message or "Upload SeerAttention model (seer-attn push)")
    if create_pr and getattr(info, "pr_url", None):
        return info.pr_url
    base = str(getattr(url, "url", url)).rstrip("/")
    return base + (f"/tree/{revision}" if revision else "")


def add_push_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("folder", help="a folder written by seer-attn export")
    p.add_argument("--repo-id", required=True, type=repo_id_arg, help="NAMESPACE/NAME of the Hub repo")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                                                          "visibility)")
    p.add_argument("--revision", default=None, help="branch to upload to (created when missing; default: main)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing directly")
    p.add_argument("--commit-message", default=None)
    return p


def run_push(args) -> str:
    from seer_attn.training.cli_args import user_input
    with user_input():
        url = push_folder(args.folder, args.repo_id, private=True if args.private else None, revision=args.revision,
                          create_pr=args.create_pr, commit_message=args.commit_message)
    print(f"[push] {url}")
    return url
