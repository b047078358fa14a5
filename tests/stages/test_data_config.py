"""Tests of lowrank_vit/stages/data_config.py."""

from __future__ import annotations

import pytest

from lowrank_vit.stages.data_config import DataConfig
from tests.helpers import (
    make_tiny_vit,
)


@pytest.mark.usefixtures("offline")
def test_an_unknown_interpolation_lists_the_known_ones():
    from lowrank_vit.stages.data_config import INTERPOLATIONS, check_preprocessing

    with pytest.raises(ValueError) as info:
        check_preprocessing({"interpolation": "cubic-ish"})
    assert str(info.value) == f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got 'cubic-ish'"


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("size", [224.0, True, "224", 0])
def test_an_image_size_that_is_not_a_positive_integer_is_refused(size):
    from lowrank_vit.stages.data_config import DataConfig

    with pytest.raises(ValueError) as info:
        DataConfig(path="somewhere", img_size=size)
    assert str(info.value) == f"img_size must be a positive integer, got {size!r}"


@pytest.mark.usefixtures("offline")
def test_a_message_of_exactly_the_limit_is_kept_whole():
    from lowrank_vit.stages.data_config import one_line

    assert one_line("a" * 10, limit=10) == "a" * 10
    assert one_line("a" * 11, limit=10) == "a" * 7 + "..."


@pytest.mark.usefixtures("offline")
def test_val_labels_given_as_a_path_is_kept_as_its_text(tmp_path):
    from lowrank_vit.stages.data_config import DataConfig

    cfg = DataConfig(path=str(tmp_path), val_labels=tmp_path / "labels.txt")
    assert cfg.val_labels == str(tmp_path / "labels.txt")


@pytest.mark.parametrize(("fields", "message"), [
    ({"name": None}, "give name="),
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0$"),
    ({"calib_samples": 0},
     r"calib_samples must be a positive integer, got 0 \(the calibration subset cannot be empty\)$"),
    ({"val_fraction": 1.0}, "val_fraction must lie strictly between 0 and 1"),
    ({"holdout": "no"}, "holdout must be True or False, got 'no'"),
    ({"holdout": 0}, "holdout must be True or False, got 0"),
    ({"in_chans": 2}, "in_chans must be 1 or 3"),
    ({"name": None, "path": ""}, "path must be a non-empty path"),
    ({"name": None, "path": 3}, "path must be a non-empty path"),
    ({"name": "  "}, "name must be a non-empty string"),
    ({"name": 7}, "name must be a non-empty string"),
    ({"num_workers": -1}, "num_workers must be a non-negative integer"),
    ({"num_workers": True}, "num_workers must be a non-negative integer"),
    ({"std": 0.0}, "std must be positive"),
    ({"std": (0.5, 0.0, 0.5)}, "std must be positive"),
    ({"crop_pct": "0.9"}, "crop_pct must lie in"),
    ({"crop_pct": 1.5}, "crop_pct must lie in"),
    ({"interpolation": "nearestish"}, "interpolation must be one of"),
])
def test_config_validation(fields, message):
    """Each invalid field names itself (a table, one row per rule); the defaults beside it are valid."""
    with pytest.raises(ValueError, match=message):
        DataConfig(**{"name": "mnist-5k", **fields})
    ok = {"num_workers": 0, "std": (0.5, 0.25, 1.0), "crop_pct": 1, "interpolation": "bicubic"}
    cfg = DataConfig(name="mnist-5k", **ok)
    assert (cfg.num_workers, cfg.std, cfg.crop_pct, cfg.interpolation) == (0, (0.5, 0.25, 1.0), 1.0, "bicubic")
    with pytest.raises(ValueError, match="takes no path"):
        DataConfig(name="mnist-5k", path="/tmp")
    cfg = DataConfig(name="imagenet-1k", token="hf_secret")
    assert "hf_secret" not in repr(cfg) and "token" not in cfg.to_dict()
    assert DataConfig.from_dict(DataConfig(name="mnist-5k", seed=3).to_dict()) == DataConfig(name="mnist-5k", seed=3)
    with pytest.raises(ValueError, match="unknown"):
        DataConfig.from_dict({"name": "mnist-5k", "batchsize": 3})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), (0.5, 0.5, 0.5, 0.5, 0.5)])
def test_mean_and_std_name_what_is_wrong_with_them(value):
    from lowrank_vit.stages.data_config import check_preprocessing

    with pytest.raises(ValueError, match=r"std must be one finite number or one per channel \(at most 4\)"):
        check_preprocessing({"std": value})


@pytest.mark.parametrize("size", [0, -32])
def test_a_non_positive_image_size_is_refused(size):
    """img_size=0 (or negative) would fail later inside timm's transforms with an unrelated message: the config
    refuses it at once, naming the field."""
    from lowrank_vit.stages.data_config import DataConfig

    with pytest.raises(ValueError, match="img_size must be a positive integer"):
        DataConfig(name="mnist-5k", img_size=size)


def test_a_missing_column_error_lists_every_column_of_a_wide_table_and_the_fix(tmp_path):
    """A table with dozens of columns: the error must still list them all and end with the fix (set image_column=),
    not be cut off before it (data errors are kept to one line of at most 1,000 characters)."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig, DataFormatError

    columns = {f"measurement_column_{i:02d}": list(range(4)) for i in range(30)}
    columns["img"] = [Image.new("L", (8, 8), i) for i in range(4)]
    columns["label"] = [0, 1, 0, 1]
    path = tmp_path / "wide.parquet"
    datasets.Dataset.from_dict(columns).to_parquet(str(path))
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "hf_cache"), batch_size=2, image_column="picture")
    with pytest.raises(DataFormatError) as err:
        build_datamodule(cfg, make_tiny_vit()).setup()
    message = str(err.value)
    assert "\n" not in message and len(message) > 400
    assert all(repr(name) in message for name in columns)
    assert message.endswith("set image_column= to one of them")


def test_a_data_config_on_the_0_255_scale_is_refused():
    """From the API as from the CLI: pixels are scaled to [0, 1] before normalizing, so 123.675 is a unit slip."""
    from lowrank_vit.stages.data_config import DataConfig

    with pytest.raises(ValueError, match=r"mean 123.675 116.28 103.53 looks like the 0-255 scale.*"
                                         r"\(0.485 0.456 0.406\)"):
        DataConfig(name="mnist-5k", mean=(123.675, 116.28, 103.53), std=(0.229, 0.224, 0.225))
    assert DataConfig(name="mnist-5k", mean=(0.0,), std=(1.0,)).std == (1.0,)  # no normalization: still allowed


def test_an_unknown_preprocessing_field_is_named_with_the_known_ones():
    from lowrank_vit.stages.data_config import PREPROCESSING_FIELDS, check_preprocessing

    with pytest.raises(ValueError) as err:
        check_preprocessing({"normalise": 0.5})
    assert "'normalise'" in str(err.value) and all(f in str(err.value) for f in PREPROCESSING_FIELDS)


@pytest.mark.parametrize(("fields", "ok"), [
    ({"val_fraction": 0.0}, False), ({"val_fraction": 5e-324}, True),
    ({"val_fraction": 1.0}, False), ({"val_fraction": 0.9999999999999999}, True),
    ({"crop_pct": 1.0}, True), ({"crop_pct": 1.0000000000000002}, False),
    ({"crop_pct": 0.0}, False), ({"crop_pct": 5e-324}, True),
    ({"std": 5e-324}, True), ({"std": (0.3, 0.0, 0.2)}, False), ({"std": (0.3, -5e-324, 0.2)}, False),
    ({"mean": 1.0}, True), ({"mean": (0.5, 1.0000000000000002, 0.5)}, False),  # 0-255 scale: above 1
    ({"std": (0.2, 0.3, 0.4, 0.5)}, True), ({"mean": (0.1, 0.2, 0.3, 0.4, 0.5)}, False),  # at most 4 channels
    ({"num_workers": 0}, True), ({"num_workers": -1}, False),
    ({"img_size": 1}, True), ({"img_size": 0}, False),
    ({"in_chans": 1}, True), ({"in_chans": 3}, True), ({"in_chans": 2}, False), ({"in_chans": 4}, False),
])
def test_data_config_rules_at_their_edges(fields, ok):
    """Each numeric rule of DataConfig at its threshold and one step (or one float) on either side."""
    if ok:
        DataConfig(name="mnist-5k", **fields)
    else:
        with pytest.raises(ValueError, match=f"^{next(iter(fields))} "):
            DataConfig(name="mnist-5k", **fields)
