"""Writes the flat remote-code bundle of a saved model folder.

``save_pretrained`` copies only modules reached through same-folder relative imports;
the kernels live in another package folder, so this writer copies the modeling modules
and, following their imports, the kernel modules, rewriting package imports
(``from seer_attn.kernels.x import ...``) into flat ones (``from .x import ...``). The
kernel source thus exists once in the repository; every bundle is generated from it.

Works both in the installed package and inside a bundle loaded as remote code (where
every module is already flat). The entry modules of each family come from the family
registry (:mod:`.families`). Standard library only.
"""
import importlib.util
import re
from pathlib import Path

from .families import family_for

_PKG_IMPORT = re.compile(r"^(\s*)from\s+seer_attn\.(?:kernels|modeling_seer)\.(\w+)\s+import", re.MULTILINE)
_REL_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)


def _source_dirs():
    dirs = [Path(__file__).resolve().parent]
    for pkg in ("seer_attn.kernels", "seer_attn.modeling_seer"):
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            dirs += [Path(p) for p in spec.submodule_search_locations]
    return dirs


def flatten_source(text: str) -> str:
    """Rewrite package imports of this project into flat relative imports."""
    return _PKG_IMPORT.sub(lambda m: f"{m.group(1)}from .{m.group(2)} import", text)


def bundle_sources(model_type: str) -> dict:
    """``{file name: flattened source}`` of every module the bundle of the family of
    ``model_type`` (e.g. ``"seer_llama"``) needs."""
    dirs = _source_dirs()
    todo, out = list(family_for(model_type).bundle_modules), {}
    while todo:
        name = todo.pop()
        if f"{name}.py" in out:
            continue
        src = next((d / f"{name}.py" for d in dirs if (d / f"{name}.py").is_file()), None)
        if src is None:
            raise FileNotFoundError(f"remote-code module {name}.py not found in {[str(d) for d in dirs]}")
        text = flatten_source(src.read_text(encoding="utf-8"))
        out[f"{name}.py"] = text
        todo += _REL_IMPORT.findall(text)
    return out


def write_remote_code(folder, model_type: str) -> list:
    """Write the flat bundle of ``model_type``'s family into ``folder``; returns the written paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in sorted(bundle_sources(model_type).items()):
        (folder / name).write_text(text, encoding="utf-8")
        written.append(folder / name)
    return written
