"""Tests of lowrank_vit/core/progress.py. Every bar belongs on stderr: stdout carries what users pipe."""

from __future__ import annotations

import pytest
import torch
from tqdm import tqdm

from lowrank_vit.core.progress import lightning_progress_callbacks, progress_bar

pytestmark = pytest.mark.usefixtures("one_thread")


def test_progress_bar_draws_on_stderr_only_and_is_closed_after_the_block(capsys):
    with progress_bar(4, "calibrating", unit="batch") as bar:
        assert isinstance(bar, tqdm) and bar.total == 4 and bar.unit == "batch"
        bar.update(4)
        assert bar.n == 4
    out, err = capsys.readouterr()
    assert out == ""
    assert "calibrating:   0%" in err and "0/4" in err and "batch/s" in err  # drawn when made
    assert bar not in tqdm._instances  # closed: no longer drawn or refreshed


def test_a_disabled_progress_bar_counts_but_draws_nothing(capsys):
    with progress_bar(3, "calibrating", enabled=False) as bar:
        bar.update(2)
        assert bar.disable
    assert capsys.readouterr() == ("", "")


def test_progress_bar_is_closed_when_the_block_raises(capsys):
    with pytest.raises(RuntimeError, match="stop"), progress_bar(5, "fitting") as bar:
        bar.update(1)
        raise RuntimeError("stop")
    assert bar not in tqdm._instances
    assert "fitting" in capsys.readouterr().err


def test_disabled_lightning_progress_gives_no_callback():
    assert lightning_progress_callbacks(False) == []


def test_lightning_bars_are_drawn_on_stderr(capsys):
    from lightning.pytorch.callbacks import TQDMProgressBar

    (callback,) = lightning_progress_callbacks(True)
    assert isinstance(callback, TQDMProgressBar)
    for bar in (callback.init_sanity_tqdm(), callback.init_train_tqdm()):  # the two that need no trainer
        bar.set_description("drawn-here")
        bar.update(1)
        bar.close()
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("drawn-here") >= 2


def test_a_lightning_fit_with_the_callback_leaves_stdout_empty(capsys, tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=4)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=lightning_progress_callbacks(True),
                         enable_progress_bar=True, default_root_dir=tmp_path)
    trainer.fit(Tiny(), data)
    out, err = capsys.readouterr()
    assert out == ""
    assert "Epoch 0" in err and "2/2" in err
