"""seer_attn.training.run_config: run configs checked on creation, built from the command line
at its edge, recorded in results envelopes; DistillConfig and FineTuneConfig, the training tier's."""
import argparse
import dataclasses
import json
from dataclasses import dataclass

import pytest

from seer_attn.training import cli_args as ca
from seer_attn.training.distill import DistillConfig, add_distill_args
from seer_attn.training.results import envelope
from seer_attn.training.run_config import (ConfigError, RunConfig, config_from_args, default, flag, option,
                                           text)


@dataclass(frozen=True, kw_only=True)
class Toy(RunConfig):
    name: str = option(check=text)
    n: int = option(3, ca.positive_int)
    ratios: tuple = option((0.5,), ca.unit_interval, many="+")
    extra: tuple = option((), ca.nonneg_int, many="*")
    mode: str | None = option(None, choices=("a", "b"))
    quiet: bool = option(False, flag)

    def check(self):
        if self.mode == "b" and self.n < 2:
            raise ConfigError("{mode}='b' needs {n} >= 2", "mode", "n")


def _parser():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--n", type=ca.positive_int, default=default(Toy, "n"))
    ap.add_argument("--ratios", type=ca.unit_interval, nargs="+", default=default(Toy, "ratios"))
    ap.add_argument("--mode", choices=("a", "b"), default=None)
    ap.add_argument("--quiet", action="store_true")
    return ap


def test_fields_are_checked_and_normalised():
    t = Toy(name="x", ratios=[1, 0.25], extra=[])
    assert (t.n, t.ratios, t.extra, t.mode, t.quiet) == (3, (1.0, 0.25), (), None, False)
    assert Toy(name="x", n=4.0).n == 4 and type(Toy(name="x", n=4.0).n) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.n = 0  # no way around the checks after creation


@pytest.mark.parametrize("fields, message", [
    ({"name": "x", "n": 0}, "n=0 is invalid: expected an integer >= 1"),
    ({"name": "x", "n": True}, "n=True is invalid: expected an integer >= 1"),
    ({"name": "x", "n": 2.5}, "n=2.5 is invalid: expected an integer >= 1"),
    ({"name": "x", "ratios": (0.5, 2)}, r"ratios\[1\]=2 is invalid: expected a number 0 < x <= 1"),
    ({"name": "x", "ratios": ()}, r"ratios=\(\) is invalid: expected at least one value"),
    ({"name": "x", "ratios": 0.5}, "ratios=0.5 is invalid: expected a list of values"),
    ({"name": "x", "extra": "12"}, "extra='12' is invalid: expected a list of values"),
    ({"name": "x", "mode": "c"}, r"mode='c' is invalid: expected one of \('a', 'b'\)"),
    ({"name": "x", "quiet": 1}, "quiet=1 is invalid: expected True or False"),
    ({"name": ""}, "name='' is invalid: expected a non-empty string"),
    ({"name": None}, "name=None is invalid: a value is required"),
    ({"name": "x", "mode": "b", "n": 1}, "mode='b' needs n >= 2"),
], ids=["zero", "bool", "fraction", "item", "empty", "scalar-for-list", "string-for-list", "choice", "flag",
        "empty-string", "required-none", "cross-field"])
def test_bad_fields_are_one_line_value_errors(fields, message):
    with pytest.raises(ValueError, match=message) as err:
        Toy(**fields)
    assert isinstance(err.value, ConfigError) and "\n" not in str(err.value)


def test_messages_name_options_on_the_command_line():
    err = pytest.raises(ConfigError, Toy, name="x", mode="b", n=1).value
    assert str(err) == "mode='b' needs n >= 2" and err.cli_message() == "--mode='b' needs --n >= 2"
    err = pytest.raises(ConfigError, Toy, name="{x}", n=0).value  # braces in values are kept as they are
    assert err.cli_message() == "--n=0 is invalid: expected an integer >= 1"
    err = pytest.raises(ConfigError, Toy, name="x", extra=[1, -1]).value
    assert str(err) == "extra[1]=-1 is invalid: expected an integer >= 0"


def test_config_from_args_at_the_edge(capsys):
    ap = _parser()
    assert config_from_args(Toy, ap.parse_args(["--name", "x"])) == Toy(name="x")  # the parser's defaults are Toy's
    got = config_from_args(Toy, ap.parse_args(["--name", "x", "--ratios", "1", "--n", "5"]), quiet=True)
    assert got == Toy(name="x", ratios=(1.0,), n=5, quiet=True)
    args = ap.parse_args(["--name", "x", "--mode", "b", "--n", "1"])
    with pytest.raises(ValueError, match="^--mode='b' needs --n >= 2$") as err:  # for seer-attn: one line, exit 2
        config_from_args(Toy, args)
    assert getattr(err.value, ca._MARK, False)
    with pytest.raises(SystemExit) as exit_:  # a standalone command: argparse's usage error
        config_from_args(Toy, args, parser=ap)
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().endswith("error: --mode='b' needs --n >= 2")


def test_replace_checks_again():
    t = Toy(name="x")
    assert t.replace(n=7).n == 7
    with pytest.raises(ValueError, match="n=-1 is invalid"):
        t.replace(n=-1)


def test_default_of_a_field():
    assert default(Toy, "ratios") == (0.5,) and default(Toy, "name") is None and default(Toy, "mode") is None
    with pytest.raises(KeyError, match="no field 'nope'"):
        default(Toy, "nope")


def test_envelope_records_the_config_and_rebuilds_it():
    t = Toy(name="x", ratios=[0.1, 0.2], mode="a")
    env = json.loads(json.dumps(envelope("unit", [], config=dataclasses.asdict(t), command=["x"])))
    assert env["config"] == {"name": "x", "n": 3, "ratios": [0.1, 0.2], "extra": [], "mode": "a", "quiet": False}
    assert Toy(**env["config"]) == t


# ----------------------------------------------------------------------------- DistillConfig

def test_distill_config_defaults_are_the_command_lines():
    assert config_from_args(DistillConfig, add_distill_args(argparse.ArgumentParser()).parse_args([])) == \
        DistillConfig()
    cfg = DistillConfig(data=["a.jsonl", "b.txt"], steps=5, bf16=True)
    assert cfg.data == ("a.jsonl", "b.txt") and cfg.output == "seer_outputs/distill"  # a git-ignored folder


@pytest.mark.parametrize("fields, message", [
    ({"steps": 0}, "steps=0 is invalid: expected an integer >= 1"),
    ({"seq_len": 192}, "seq_len=192 is invalid: expected an integer >= 256 (with fewer than 4 blocks"),
    ({"lr": float("nan")}, "lr=nan is invalid: expected a number 0 < x"),
    ({"threshold": 1.0}, "threshold=1.0 is invalid: expected a number 0 < x < 1"),
    ({"distill_target": "min"}, "distill_target='min' is invalid: expected one of ('max', 'mass')"),
    ({"data": "train.jsonl"}, "data='train.jsonl' is invalid: expected a list of values"),
    ({"bf16": "true"}, "bf16='true' is invalid: expected True or False"),
    ({"output": ""}, "output='' is invalid: expected a non-empty string"),
    ({"retrieval_mix": 1.5}, "retrieval_mix=1.5 is invalid: expected a number 0 <= x <= 1"),
    ({"retrieval_kinds": ("needle",)}, "retrieval_kinds[0]='needle' is invalid: expected one of ('repeat', "),
    ({"peak_weight": -1}, "peak_weight=-1 is invalid: expected a number 0 <= x"),
    ({"distill_prior": 1.0}, "distill_prior=1.0 is invalid: expected a number 0 < x < 1"),
    ({"retrieval_mix": 0.25, "streaming": True}, "retrieval_mix rewrites packed sequences, which a stream does not"),
], ids=["steps", "seq-len", "lr", "threshold", "target", "data", "bf16", "output", "retrieval-mix", "retrieval-kinds",
        "peak-weight", "distill-prior", "retrieval-stream"])
def test_distill_config_refuses_bad_fields(fields, message):
    with pytest.raises(ValueError) as err:
        DistillConfig(**fields)
    assert str(err.value).startswith(message)


def test_run_distill_takes_a_config():
    from seer_attn.training.distill import run_distill
    with pytest.raises(TypeError, match="run_distill takes a DistillConfig, got Namespace"):
        run_distill(argparse.Namespace(steps=1))


# ----------------------------------------------------------------------------- FineTuneConfig

def test_finetune_config_defaults_are_the_command_lines():
    from seer_attn.training.finetune import LORA_TARGETS, FineTuneConfig, add_finetune_args
    args = add_finetune_args(argparse.ArgumentParser()).parse_args([])
    assert {f.name for f in dataclasses.fields(FineTuneConfig)} == set(vars(args))  # every field is an option
    assert config_from_args(FineTuneConfig, args) == FineTuneConfig()
    cfg = FineTuneConfig(data=["a.jsonl"], lora_targets=["q_proj", "v_proj"], density=0.1, yarn_factor=4)
    assert cfg.data == ("a.jsonl",) and cfg.lora_targets == ("q_proj", "v_proj") and cfg.selection == "nz_ratio=0.1"
    assert FineTuneConfig().lora_targets == LORA_TARGETS and FineTuneConfig().selection == "dense"
    assert FineTuneConfig().output == "seer_outputs/finetune"  # a git-ignored folder
    env = json.loads(json.dumps(envelope("finetune", [], config=dataclasses.asdict(cfg), command=["x"])))
    assert FineTuneConfig(**env["config"]) == cfg


@pytest.mark.parametrize("fields, message", [
    ({"yarn_factor": 0.5}, "yarn_factor=0.5 is invalid: expected a number 1 <= x"),
    ({"density": 0}, "density=0 is invalid: expected a number 0 < x <= 1"),
    ({"density": 1.5}, "density=1.5 is invalid: expected a number 0 < x <= 1"),
    ({"threshold": 1}, "threshold=1 is invalid: expected a number 0 < x < 1"),
    ({"density": 0.5, "threshold": 0.01}, "density=0.5 and threshold=0.01: give one, not both"),
    ({"seq_len": 128}, "seq_len=128 is invalid: expected an integer >= 256"),
    ({"gate_loss_stride": 0}, "gate_loss_stride=0 is invalid: expected an integer >= 1"),
    ({"lora_r": 0}, "lora_r=0 is invalid: expected an integer >= 1"),
    ({"lora_dropout": 1.0}, "lora_dropout=1.0 is invalid: expected a number 0 <= x < 1"),
    ({"lora_targets": []}, "lora_targets=() is invalid: expected at least one value"),
    ({"packing": "mixed"}, "packing='mixed' is invalid: expected one of ('per-source', 'joined')"),
    ({"bf16": 1}, "bf16=1 is invalid: expected True or False"),
], ids=["factor", "density-0", "density-1.5", "threshold-1", "density-and-threshold", "seq-len", "stride", "lora-r",
        "dropout", "targets", "packing", "bf16"])
def test_finetune_config_refuses_bad_fields(fields, message):
    from seer_attn.training.finetune import FineTuneConfig
    with pytest.raises(ValueError) as err:
        FineTuneConfig(**fields)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_run_finetune_takes_a_config():
    from seer_attn.training.finetune import run_finetune
    with pytest.raises(TypeError, match="run_finetune takes a FineTuneConfig, got Namespace"):
        run_finetune(argparse.Namespace(steps=1))
