"""Tests of lowrank_vit/core/files.py."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.usefixtures("one_thread_module")
def test_saved_files_follow_the_umask_like_any_other_file(tmp_path):
    """Files are written to a temporary name (mkstemp: mode 0600) and renamed: they must end with the mode every
    other file the user writes gets, not private to the user."""
    import os

    from lowrank_vit.core.files import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", lambda p: p.write_text("{}"))
        os.umask(0o077)
        atomic_write(tmp_path / "b.json", lambda p: p.write_text("{}"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


def test_reports_and_json_output_are_strict_json(tmp_path):
    """A NaN or infinite figure (an error that overflowed, a latency that was not timed) is written as null:
    json.dumps alone writes a bare NaN, which jq and browsers refuse. One writer serves reports, the registry's
    results and tables, and the resume record."""
    from lowrank_vit.core.files import strict_json, write_json

    data = {"error": float("nan"), "layers": [{"rank": 3, "error": float("inf")}], "t": (1.5, -float("inf")),
            "path": tmp_path, "device": torch.device("cpu")}
    write_json(tmp_path / "new" / "r.json", data)  # its folder made too
    strict = json.loads((tmp_path / "new" / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert strict == {"error": None, "layers": [{"rank": 3, "error": None}], "t": [1.5, None],
                      "path": str(tmp_path), "device": "cpu"}
    assert json.loads(strict_json(data)) == strict
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["r.json"]  # no temporary file left beside it
    with pytest.raises(TypeError, match="not JSON-serializable: object"):
        strict_json({"x": object()})
