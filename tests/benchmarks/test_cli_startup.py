"""Tests of benchmarks/cli_startup.py."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load, positive_finite


@pytest.mark.slow
def test_the_startup_benchmark_times_each_command_and_finds_no_deferred_package_loaded(tmp_path, capsys):
    cli_startup = load("cli_startup")
    out = tmp_path / "startup.json"
    assert cli_startup.main(["--repeats", "1", "--packages", "scipy", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    names = [c["command"] for c in result["commands"]]
    assert names == ["import lowrank_vit", "lowrank-vit --help", "lowrank-vit list"]
    for command in result["commands"]:
        assert positive_finite(command["seconds"]) and len(command["samples"]) == 1
        assert command["deferred_loaded"] == [], command  # the point of deferring them
    (scipy,) = result["deferred"]
    assert scipy["package"] == "scipy" and scipy["installed"] and positive_finite(scipy["seconds_after_torch"])
    assert "lowrank-vit list" in capsys.readouterr().out


def test_the_startup_benchmark_refuses_an_unknown_package_in_one_line(capsys):
    cli_startup = load("cli_startup")
    with pytest.raises(SystemExit) as exit_:
        cli_startup.main(["--packages", "numpy"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cli_startup.py: error:") and "numpy" in err[0]
