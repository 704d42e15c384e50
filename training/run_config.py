"""Run configs: the settings of one run of a command, as a frozen dataclass.

Each command that runs something has one: :class:`~seer_attn.training.distill.DistillConfig`
(``seer-attn distill``) and :class:`~seer_attn.training.finetune.FineTuneConfig`
(``seer-attn finetune``) here in training/, and in eval/ ``DemoConfig`` (``seer-attn demo``),
``EvalConfig`` (``seer-attn eval``), ``CompareConfig`` (``seer-attn compare``),
``QualityRunConfig`` (``python -m seer_attn.eval.quality_run``), ``FineTuneRunConfig``
(``python -m seer_attn.eval.finetune_run``) and the benchmarks'. Python code builds them
directly and hands them to the command's ``run_*`` function; argparse exists only at the
command-line edge, where :func:`config_from_args` turns the parsed options into the config::

    from seer_attn.training.distill import DistillConfig, run_distill
    run_distill(DistillConfig(seq_len=2048, steps=40, output="seer_outputs/mine"))

Every field is declared once, with :func:`option`: its default and its check (the same
functions argparse's ``type=`` uses, :mod:`seer_attn.training.cli_args`). ``__post_init__``
(:class:`RunConfig`) checks each field, then the config's cross-field rules
(:meth:`RunConfig.check`), and refuses a bad value with one line naming the field and the
value (:class:`ConfigError`, a ValueError)::

    ValueError: steps=0 is invalid: expected an integer >= 1

Fields hold JSON values only (strings, numbers, booleans, None, tuples of them, a dict), so a
results envelope records ``dataclasses.asdict(config)`` as its ``config`` and
``Config(**envelope["config"])`` rebuilds the run's config. Sequences are stored as tuples;
the command lines take their defaults from the dataclass (:func:`default`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import MISSING, dataclass, field

from .cli_args import ArgValueError, user_input


class ConfigError(ValueError):
    """A run config refused: one line naming the field(s) and the value.

    ``message`` names each field of ``fields`` as ``{field}``; ``str(err)`` renders the names
    as Python spells them (``steps``), :meth:`cli_message` as options (``--steps``), for the
    command lines, whose options are the fields' names with dashes."""

    def __init__(self, message: str, *fields: str):
        self.template, self.fields = message, fields
        super().__init__(self._render(lambda name: name))

    def _render(self, spell):
        return self.template.format(**{f: spell(f) for f in self.fields})

    def cli_message(self) -> str:
        return self._render(lambda name: "--" + name.replace("_", "-"))

    @classmethod
    def invalid(cls, name: str, value, reason: str, index=None) -> "ConfigError":
        """``NAME=VALUE is invalid: REASON`` (``NAME[i]=...`` for one item of a sequence)."""
        def esc(text):
            return str(text).replace("{", "{{").replace("}", "}}")
        where = "" if index is None else f"[{index}]"
        return cls("{%s}%s=%s is invalid: %s" % (name, where, esc(repr(value)), esc(reason)), name)


def text(value) -> str:
    """Check: a non-empty string (a path-like object becomes its string)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ArgValueError("expected a non-empty string", value)
    return value


def flag(value) -> bool:
    """Check: True or False (not 1, not "yes")."""
    if not isinstance(value, bool):
        raise ArgValueError("expected True or False", value)
    return value


def option(default=MISSING, check=None, *, many=False, choices=None, optional=None):
    """A run-config field: its ``default`` (none: the field is required), the ``check`` of its
    value (a function returning the checked value or raising ArgValueError / ValueError),
    ``many`` (``"+"``: a sequence of at least one checked value, ``"*"``: of any length,
    stored as a tuple), ``choices`` (the allowed values). ``None`` is allowed when the default
    is None (or ``optional=True``)."""
    if many and isinstance(default, (list, tuple)):
        default = tuple(default)
    meta = {"check": check, "many": many, "choices": tuple(choices) if choices else None,
            "optional": default is None if optional is None else optional}
    return field(default=default, metadata=meta)


def _check_one(name, value, meta, index=None):
    check, choices = meta.get("check"), meta.get("choices")
    if check is not None:
        try:
            value = check(value)
        except ArgValueError as err:
            raise ConfigError.invalid(name, value, err.reason, index) from None
        except (TypeError, ValueError) as err:
            raise ConfigError.invalid(name, value, str(err), index) from None
    if choices is not None and value not in choices:
        raise ConfigError.invalid(name, value, f"expected one of {choices}", index)
    return value


def _check_field(f, value):
    meta = f.metadata
    if value is None:
        if meta.get("optional", True):
            return None
        raise ConfigError.invalid(f.name, value, "a value is required")
    many = meta.get("many")
    if not many:
        return _check_one(f.name, value, meta)
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise ConfigError.invalid(f.name, value, "expected a list of values")
    value = tuple(_check_one(f.name, v, meta, i) for i, v in enumerate(value))
    if many == "+" and not value:
        raise ConfigError.invalid(f.name, value, "expected at least one value")
    return value


@dataclass(frozen=True)
class RunConfig:
    """Base of the run configs (module docstring): every field checked on creation."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.metadata:
                object.__setattr__(self, f.name, _check_field(f, getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Rules between fields; raise :class:`ConfigError` naming them (none by default)."""

    def replace(self, **changes):
        """A copy with ``changes``, checked again (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


def default(cls, name: str):
    """The default of field ``name`` of run config ``cls`` (what its command line shows)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            return None
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def config_from_args(cls, args, parser=None, **overrides):
    """The run config ``cls`` from parsed options ``args`` (every option whose dest is a
    field; ``overrides`` win). A config the options cannot make (a rule between fields)
    is a usage error naming the options: ``parser.error(...)`` (exit code 2) when ``parser``
    is given, else a ValueError marked as user input (:func:`~seer_attn.training.cli_args.user_input`:
    ``seer-attn`` prints it as one line, exit code 2)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    try:
        return cls(**values)
    except ConfigError as err:
        if parser is not None:
            parser.error(err.cli_message())
        with user_input():
            raise ValueError(err.cli_message()) from None
