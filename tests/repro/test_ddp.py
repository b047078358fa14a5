"""Tests of lowrank_vit/repro/ddp.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import (
    QUICK,
    REPO,
    _result,
    make_tiny_vit,
)


@pytest.mark.usefixtures("offline_no_token")
@pytest.mark.slow
def test_run_ddp_two_cpu_processes(tmp_path):
    """`run --devices 2 --accelerator cpu`: Lightning relaunches the command per rank; rank zero alone writes and
    logs: one offline wandb run, in the row's directory, and none anywhere else (the processes run in tmp_path)."""
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "LOWRANK_VIT_CACHE": str(tmp_path / "c"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    quick = [arg for arg in QUICK if arg not in ("--wandb", "disabled")] + ["--wandb", "offline"]
    proc = subprocess.run([sys.executable, "-m", "lowrank_vit.cli.main", "run", "table2/deit_s/ours-50", "--scale",
                           "smoke", "--output", str(out), "--devices", "2", "--accelerator", "cpu", *quick],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = _result(out, "table2/deit_s/ours-50")
    assert row["finetune"]["world_size"] == 2 and row["finetune"]["steps"] == 3
    assert row["config"]["hardware"]["devices"] == 2
    assert (out / "table2/deit_s/ours-50/model/model.safetensors").is_file()
    runs = sorted(tmp_path.rglob("offline-run-*"))
    assert len(runs) == 1 and runs[0].parent == out / "table2/deit_s/ours-50/wandb", runs
    assert not list(out.rglob(".compressed-for-ranks"))  # rank zero's hand-over to the other rank is cleaned up


@pytest.mark.usefixtures("offline_no_token")
def test_rank_zero_hands_its_compressed_model_to_the_other_ranks(tmp_path, monkeypatch, calib_batches):
    """Under DDP the fine-tune's processes load rank zero's compressed model instead of compressing again; only a
    non-zero rank of the same row takes it, and nothing is left behind, even when the fine-tune fails."""
    from lowrank_vit import compress
    from lowrank_vit.io.surgery import load_compressed
    from lowrank_vit.repro.ddp import SHARED_ENV, share_compressed, shared_compressed

    model = make_tiny_vit()
    compress(model, calib_batches, reduction=0.5, calib_samples=64, progress=False)
    monkeypatch.delenv(SHARED_ENV, raising=False)
    monkeypatch.setenv("RANK", "1")
    with share_compressed(model, "row/a", tmp_path, enabled=True):
        path = shared_compressed("row/a")
        assert path is not None and path.parent == tmp_path.resolve()
        assert shared_compressed("row/b") is None  # another row's processes compress themselves
        monkeypatch.setenv("RANK", "0")
        assert shared_compressed("row/a") is None  # rank zero has its own
        monkeypatch.setenv("RANK", "1")
        loaded = load_compressed(path)
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    assert SHARED_ENV not in os.environ and list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), share_compressed(model, "row/a", tmp_path, enabled=True):
        raise RuntimeError("the fine-tune failed")
    assert SHARED_ENV not in os.environ and list(tmp_path.iterdir()) == []
    with share_compressed(model, "row/a", tmp_path, enabled=False):  # one process: nothing to hand over
        assert shared_compressed("row/a") is None and list(tmp_path.iterdir()) == []
