"""Tests of benchmarks/benchmarks.py."""

from __future__ import annotations

import pytest

from tests.helpers import TOY, load


@pytest.mark.parametrize("script, argv, message", [
    ("inference", ["--model", "no_such_model"], "unknown model"),
    ("inference", [*TOY, "--reduction", "1.2"], "strictly between 0 and 1"),
    ("inference", [*TOY, "--reduction", "0"], "strictly between 0 and 1"),
    ("inference", [*TOY, "--batch-size", "0"], "positive integer"),
    ("compress_time", ["--model", "no_such_model"], "unknown model"),
    ("compress_time", [*TOY, "--reduction", "-0.5"], "strictly between 0 and 1"),
    ("compress_time", [*TOY, "--solver", "adam"], "invalid choice"),
    ("compress_time", ["--model", "deit_small", "--model-kwargs", "{oops"], "not valid JSON"),
    ("estimators", [*TOY, "--estimator", "fp8"], "bad --estimator"),
    ("estimators", [*TOY, "--estimator", "range+tokens:2"], "bad token fraction"),
    ("compress_time", [*TOY, "--gram-space", "output"], "invalid choice"),
    ("rank_alignment", ["--ranks", "0"], "positive integer"),
    ("latency", [*TOY, "--target-speedup", "0.9"], "must be above 1"),
    ("latency", [*TOY, "--runtime", "tensorrt"], "invalid choice"),
    ("rank_alignment", ["--device", "tpu"], "must be cpu or cuda"),
])
def test_bad_arguments_exit_2_with_one_line(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        load(script).main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1
