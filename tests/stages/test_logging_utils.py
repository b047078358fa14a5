"""Tests of lowrank_vit/stages/logging_utils.py."""

from __future__ import annotations

import copy
import warnings

import pytest
from torch.utils.data import DataLoader

from lowrank_vit import CompressionConfig, compress
from lowrank_vit.stages.finetune import finetune
from lowrank_vit.stages.finetune_config import FinetuneConfig
from lowrank_vit.stages.logging_utils import (
    RANK_COLUMNS,
    has_wandb_api_key,
    log_ranks_table,
    make_logger,
    report_rows,
    resolve_mode,
)
from tests.helpers import QUIET, make_images, make_tiny_vit, synthetic_data


@pytest.mark.usefixtures('one_thread')
def test_finetune_logs_to_wandb_offline(tiny_compressed, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lowrank_vit.stages.logging_utils import finish, log_ranks_table, make_logger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.warns(RuntimeWarning, match="no API key"):
        logger = make_logger("online", project="lowrank_vit-tests", group="exp-tiny", tags=["ours", "tiny"],
                             config={"compression": {"reduction": 0.4}}, save_dir=tmp_path / "logs",
                             job_type="finetune")
    model = copy.deepcopy(tiny_compressed)
    report = compress(make_tiny_vit(), [make_images(16)], CompressionConfig(reduction=0.4, progress=False))
    try:
        log_ranks_table(logger, report)
        data = synthetic_data(16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            finetune(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8),
                     config=FinetuneConfig(epochs=1), logger=logger, **QUIET)
        run = logger.experiment
        assert run.settings.mode in ("offline", "dryrun") or run.offline
        assert run.group == "exp-tiny" and set(run.tags) == {"ours", "tiny"}
        assert run.config["compression"]["reduction"] == 0.4
        assert run.config["finetune"]["epochs"] == 1 and "trainable_fraction" in run.config
    finally:
        finish(logger)
    assert list((tmp_path / "logs" / "wandb").glob("offline-run-*"))


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path


def test_disabled_gives_no_logger(no_credentials):
    assert make_logger("disabled") is None


def test_environment_wandb_mode_wins(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert make_logger("online") is None
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("online") == "offline"


def test_online_without_api_key_falls_back_to_offline(no_credentials):
    with pytest.warns(RuntimeWarning, match="no API key"):
        assert resolve_mode("online") == "offline"
    with pytest.warns(RuntimeWarning, match="no API key"):
        logger = make_logger("online", project="p", group="g", tags=["ours"], save_dir=no_credentials / "logs")
    assert logger._offline and logger._wandb_init["group"] == "g" and logger._wandb_init["tags"] == ["ours"]


def test_online_without_network_falls_back_to_offline(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.warns(RuntimeWarning, match="not reachable"):
        assert resolve_mode("online") == "offline"


def test_api_key_from_netrc(no_credentials):
    assert not has_wandb_api_key()
    netrc = no_credentials / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert has_wandb_api_key()


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        make_logger("sometimes")


def test_rank_rows_and_noop_table():
    model = make_tiny_vit()
    report = compress(model, [make_images(16)], CompressionConfig(reduction=0.4, progress=False))
    rows = report_rows(report)
    assert len(rows) == len(report.layers) and all(len(r) == len(RANK_COLUMNS) for r in rows)
    assert [r[0] for r in rows] == [layer.name for layer in report.layers]
    assert [r[3] for r in rows] == [layer.rank for layer in report.layers]
    assert report_rows(report.to_dict()) == rows
    log_ranks_table(None, report)  # no logger: nothing happens

    class NotWandb:
        pass

    log_ranks_table(NotWandb(), report)
