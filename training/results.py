"""Provenance and the results envelope: what every results JSON of the project carries.

Every command that writes results (distill, demo, eval, compare, quality runs, the GPU
benchmarks) writes one JSON *envelope*::

    {"schema_version": 1, "kind": "...", "complete": true,
     "provenance": {"model": ..., "commit": ..., "commit_dirty": ..., "gpu": ...,
                    "versions": {"python": ..., "torch": ..., "triton": ..., "transformers": ...},
                    "command": [...], "created": "2026-12-01T21:00:00Z"},
     "config": {...}, "rows": [...], ...}

``config`` is the run's config, ``dataclasses.asdict`` of its run config
(:mod:`seer_attn.training.run_config`), so ``Config(**env["config"])`` rebuilds it; a
command that picks values at run time (device, dtype, a default length) records them in a
``resolved`` field beside it.

``commit`` comes from ``git`` in the source tree, unless the environment names it:
``SEER_GIT_COMMIT`` and ``SEER_GIT_DIRTY`` (``0`` / ``1``) win over git, for copies of the
tree whose ``.git`` is missing or stale (a GPU machine that receives the working tree over
an old checkout reported that checkout's commit), e.g.
``SEER_GIT_COMMIT=$(git rev-parse HEAD) SEER_GIT_DIRTY=$(git status --porcelain -uno | grep -q . && echo 1 || echo 0)``.
Without either, ``commit`` is ``None`` and ``commit_dirty`` is ``None``: nothing is guessed.
The state is read when this module is first imported (the code a run executes is the tree of
that moment) and again when an envelope is written; when HEAD moved in between (a commit
during a long run), ``commit`` and ``commit_dirty`` are the first reading's and
``commit_at_write`` names the later HEAD.

Envelopes are written atomically (a temporary file renamed over the target), so a killed
run never leaves a truncated file that looks complete; a run that stops early writes
``complete: false``.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

SCHEMA_VERSION = 1
COMMIT_ENV = "SEER_GIT_COMMIT"
DIRTY_ENV = "SEER_GIT_DIRTY"
_SRC = os.path.dirname(os.path.abspath(__file__))


def _git(*cmd):
    try:
        out = subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=10, cwd=_SRC)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> tuple:
    """``(commit, dirty)`` of the source tree: the full commit hash (or None) and whether
    tracked files differ from it (or None when unknown); see the module docstring."""
    if os.environ.get(COMMIT_ENV):
        dirty = os.environ.get(DIRTY_ENV)
        return os.environ[COMMIT_ENV].strip(), ({"0": False, "1": True}.get(dirty.strip()) if dirty else None)
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


#: git_state() when this module was first imported: the tree the running process loaded
_AT_START = git_state()


def _versions() -> dict:
    import torch
    import transformers
    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("triton", "peft", "lm_eval", "accelerate"):
        try:
            mod = __import__(name)
        except ImportError:
            continue
        out[name] = getattr(mod, "__version__", "unknown")
    return out


def _device_name(device=None) -> str:
    import torch
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def provenance(model=None, *, device=None, command=None) -> dict:
    """The provenance block of a results envelope.

    Args:
        model: what the results were measured on: a model (its ``name_or_path``; its
            device is used when ``device`` is None) or a string (a path, Hub id, or a
            description such as ``"random weights, Llama-3.1-8B shape"``).
        device: the device the work ran on (default: the model's, else CUDA when present).
        command: the command line (default: ``sys.argv``).
    """
    model_name = None
    if isinstance(model, (str, os.PathLike)):
        model_name = str(model)
    elif model is not None:
        model_name = str(getattr(model, "name_or_path", "") or type(model).__name__)
        if device is None:
            try:
                device = next(model.parameters()).device
            except (StopIteration, AttributeError):
                device = None
    commit, dirty = git_state()
    moved = {}
    start_commit, start_dirty = _AT_START
    if start_commit and commit and start_commit != commit:  # HEAD moved while this process ran
        moved = {"commit_at_write": commit}
        commit, dirty = start_commit, start_dirty
    return {"model": model_name, "commit": commit, "commit_dirty": dirty, **moved, "gpu": _device_name(device),
            "versions": _versions(), "command": list(sys.argv if command is None else command),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def to_jsonable(obj):
    """``obj`` with tuples as lists, paths and dtypes as strings, dataclasses as dicts."""
    import dataclasses
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def envelope(kind: str, rows, *, config=None, model=None, device=None, command=None, complete=True,
             **extra) -> dict:
    """A results envelope (module docstring): ``kind`` names what was measured (e.g.
    ``"distill"``, ``"ppl_compare"``, ``"kernels"``); ``rows`` the measurements; ``config``
    the run's settings; ``extra`` any further top-level fields."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind={kind!r} is invalid: expected a non-empty string")
    clash = sorted(set(extra) & {"schema_version", "kind", "complete", "provenance", "config", "rows"})
    if clash:
        raise ValueError(f"extra fields {clash} would overwrite the envelope's own")
    return {"schema_version": SCHEMA_VERSION, "kind": kind, "complete": bool(complete),
            "provenance": provenance(model, device=device, command=command),
            "config": to_jsonable(config or {}), "rows": to_jsonable(list(rows)), **to_jsonable(extra)}


def write_json(path, obj) -> str:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file, then rename)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def write_envelope(path, kind, rows, **kwargs) -> dict:
    """:func:`envelope` written to ``path`` with :func:`write_json`; returns the envelope."""
    env = envelope(kind, rows, **kwargs)
    write_json(path, env)
    return env
