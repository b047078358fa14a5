"""Tests of lowrank_vit/cli/base.py."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import (
    ARCH,
    _compress_argv,
    cli,
    one_line_error,
)


@pytest.mark.usefixtures("offline")
def test_compress_quiet_prints_no_progress_bar(images_and_weights, tmp_path, capsys):
    """`--quiet`: nothing on stderr, the compression's own progress bars included (they are the longest part), and
    the datasets library's bar while it first reads an image folder (it printed one: the variable that turns them off
    is read when datasets is imported, before the command runs)."""
    code, out, err = cli(capsys, *_compress_argv(images_and_weights, tmp_path / "q", "--quiet", "--no-eval"))
    assert code == 0 and out.strip() and err == ""
    code, _, err = cli(capsys, *_compress_argv(images_and_weights, tmp_path / "loud", "--no-eval"))
    assert code == 0 and "%|" in err  # without it the bars are there: the check above can fail


@pytest.mark.usefixtures("offline")
def test_device_auto_takes_the_gpu_torch_sees(monkeypatch):
    from lowrank_vit.cli.base import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda", 0) == resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.usefixtures("offline")
def test_device_cuda_without_one_is_refused_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = cli(capsys, "evaluate", ARCH, "--data", "nowhere", "--device", "cuda")
    assert code == 2
    assert one_line_error(err) == ("lowrank-vit: error: --device cuda was asked for but torch sees no CUDA device; "
                                   "use --device cpu")


def test_unreadable_data_is_one_line_naming_it_and_quiet_is_quiet():
    import argparse
    import warnings

    from datasets.exceptions import DatasetGenerationError
    from PIL import UnidentifiedImageError

    from lowrank_vit.cli.base import UserError, user_command

    def worker_error(args):  # what a DataLoader worker re-raises: its whole traceback as the message
        raise UnidentifiedImageError("Caught UnidentifiedImageError in DataLoader worker process 0.\nOriginal "
                                     "Traceback (most recent call last):\n  ...\nPIL.UnidentifiedImageError: cannot "
                                     "identify image file '/d/val/b/0.png'")

    def builder_error(args):
        try:
            raise ValueError("Couldn't cast model.safetensors")
        except ValueError as cause:
            raise DatasetGenerationError("An error occurred while generating the dataset") from cause

    args = argparse.Namespace(data="/d", quiet=False)
    with pytest.raises(UserError, match=r"^--data '/d': PIL.UnidentifiedImageError: cannot identify image file "
                                        r"'/d/val/b/0.png'$"):
        user_command(worker_error)(args)
    with pytest.raises(UserError, match=r"could not be read as a dataset: Couldn't cast model.safetensors$"):
        user_command(builder_error)(args)

    def noisy(args):
        warnings.warn("calibration uses all 40 training images", UserWarning, stacklevel=1)
        return 0

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert user_command(noisy)(argparse.Namespace(data="/d", quiet=True)) == 0
        assert not seen
        user_command(noisy)(args)
        assert len(seen) == 1
