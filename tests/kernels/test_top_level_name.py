"""The folder kernels/ is ``seer_attn.kernels``; run from the repository root (whose folder is
then on sys.path) it must not take the top-level name ``kernels`` from Hugging Face's
kernel-hub client, which transformers >= 5.25 depends on and imports."""
import importlib.metadata
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_top_level_kernels_from_the_repository_root():
    r = _run("import kernels, seer_attn.kernels as k; print(getattr(kernels, '__file__', None)); "
             "print(hasattr(kernels, 'block_sparse_attn')); print(k.top_blocks.__module__)")
    assert r.returncode == 0, r.stderr[-2000:]
    first, ours, second = r.stdout.split()
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:  # not installed: an empty module without a file
        assert first == "None"
    else:
        assert not first.startswith(os.path.join(ROOT, "kernels")), first  # the installed package
    assert ours == "False" and second == "seer_attn.kernels.decode_select"


def test_transformers_and_the_model_import_from_the_repository_root():
    r = _run("from transformers import LlamaConfig\nfrom seer_attn.modeling_seer import SeerLlamaConfig\nprint('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
