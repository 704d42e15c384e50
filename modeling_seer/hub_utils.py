"""Local paths versus Hugging Face Hub ids, and Hub downloads with one clear error.

Copied flat into saved model folders (remote code): standard library only
(huggingface_hub is imported by the callers, inside functions).
"""
import os
import re

_FILE_SUFFIXES = (".safetensors", ".gguf", ".json", ".bin", ".pt", ".pth", ".model", ".txt")
_HUB_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}")


def resolve_source(source):
    """Decide whether ``source`` (a str or path) is a local file/folder or a Hub repo id;
    returns ``(path_or_id, is_local)``.

    A string is a local path when it exists, starts with ``/``, ``./``, ``../`` or ``~``,
    its first component is an existing folder, it has more than one ``/`` or it ends with
    a file suffix (``.safetensors``, ``.gguf``, ``.json``, ...); a missing one raises
    ``FileNotFoundError("no such file or folder: PATH")`` at once. Anything else must look
    like a Hub id (``name`` or ``namespace/name``) to be sent to the Hub."""
    text = os.fspath(source)
    path = os.path.expanduser(text)
    if os.path.exists(path):
        return path, True
    first = text.split("/")[0]
    if text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or (first != text and os.path.isdir(first)) \
            or text.lower().endswith(_FILE_SUFFIXES) or not _HUB_ID.fullmatch(text) or "--" in text or ".." in text:
        raise FileNotFoundError(f"no such file or folder: {text}")
    return text, False


def hub_offline():
    """Offline mode as the environment says now (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``;
    huggingface_hub reads them only when imported)."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_call(repo_id, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, a download from the Hub repo ``repo_id`` (``hf_hub_download``,
    ``from_pretrained``), cache-only in offline mode; a failure raises one OSError naming
    the repo and the reason."""
    offline = hub_offline()
    if offline:
        kwargs["local_files_only"] = True
    try:
        return fn(*args, **kwargs)
    except OSError as err:
        reason = "offline mode (HF_HUB_OFFLINE is set) and not in the local cache" if offline else \
            (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise OSError(f"{repo_id!r} is no local file or folder and could not be loaded from the Hugging Face "
                      f"Hub: {reason}") from None
