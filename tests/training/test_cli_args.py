"""seer_attn.training.cli_args: the value checks shared by the command lines and the run configs."""
import argparse

import pytest

from seer_attn.training import cli_args as ca


@pytest.mark.parametrize("check, good, bad", [
    (ca.positive_int, [("1", 1), ("12", 12), (3, 3), (4.0, 4)], ["0", "-2", "1.5", "x", "", True, 2.5, None]),
    (ca.nonneg_int, [("0", 0), ("7", 7)], ["-1", "nan"]),
    (ca.int_at_least(2), [("2", 2)], ["1"]),
    (ca.positive_float, [("1e-9", 1e-9), ("3", 3.0)], ["0", "-1", "nan", "inf", "abc"]),
    (ca.unit_interval, [("1", 1.0), ("0.2", 0.2)], ["0", "1.0001", "-0.5", "nan"]),
    (ca.open_unit_interval, [("0.999", 0.999), ("1e-7", 1e-7)], ["1", "0", "inf"]),
])
def test_number_checks(check, good, bad):
    for text, value in good:
        assert check(text) == value and type(check(text)) is type(value)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=f"invalid value {text!r}: expected "):
            check(text)
        with pytest.raises(ValueError):  # the same error outside argparse
            check(text)


def test_json_and_tasks():
    assert ca.json_object('{"a": [1]}') == {"a": [1]} and ca.json_object({"b": 2}) == {"b": 2}
    for text, match in (("{oops", "not valid JSON"), ("[1]", "expected a JSON object, got list")):
        with pytest.raises(ca.ArgValueError, match=match):
            ca.json_object(text)
    assert ca.task_list(" a, b ,,") == ["a", "b"] and ca.task_list(["c"]) == ["c"]
    with pytest.raises(ca.ArgValueError, match="names no task"):
        ca.task_list(" , ")


def test_reason_is_what_the_run_configs_say():
    err = pytest.raises(ca.ArgValueError, ca.int_at_least(2), "1").value
    assert str(err) == "invalid value '1': expected an integer >= 2" and err.reason == "expected an integer >= 2"
    assert str(ca.ArgValueError("no value named")) == "no value named"
