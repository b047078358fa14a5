"""Tests of lowrank_vit/repro/standins.py."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch

from lowrank_vit import get_adapter
from lowrank_vit.repro import standins as S
from lowrank_vit.repro.standins import STANDINS, StandinSpec, build_standin, standin_cache_dir
from tests.helpers import COMMITTED


@pytest.mark.usefixtures("offline")
def test_installing_the_committed_stand_in_makes_the_cache_hold_those_very_weights(tmp_path):
    """A stand-in trained on another CPU has other weights (the demo's table then differs): once installed, every
    build_standin returns the committed tensors, and installing again changes nothing."""
    from safetensors.torch import load_file

    from lowrank_vit.repro.standins import build_standin, install_standin

    truth = load_file(str(COMMITTED / "deit_s.safetensors"))
    assert install_standin("deit_s", COMMITTED, cache_dir=tmp_path) is True
    model = build_standin("deit_s", cache_dir=tmp_path, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in truth.items())
    assert install_standin("deit_s", COMMITTED, cache_dir=tmp_path) is False
    other = {k: v + 1e-3 for k, v in truth.items()}  # weights of the same recipe trained elsewhere
    from safetensors.torch import save_file

    save_file(other, str(tmp_path / "deit_s.safetensors"), metadata={"fingerprint": "x"})
    assert install_standin("deit_s", COMMITTED, cache_dir=tmp_path) is True
    assert all(torch.equal(load_file(str(tmp_path / "deit_s.safetensors"))[k], v) for k, v in truth.items())


@pytest.mark.usefixtures("offline")
def test_a_damaged_committed_stand_in_is_refused_before_the_cache_is_touched(tmp_path):
    from lowrank_vit.repro.standins import install_standin

    damaged = tmp_path / "committed"
    damaged.mkdir()
    (damaged / "deit_s.safetensors").write_bytes((COMMITTED / "deit_s.safetensors").read_bytes())
    (damaged / "deit_s.json").write_text('{"format": "lowrank_vit.standin/1", "fingerprint": "0000"}')
    with pytest.raises(ValueError, match="another recipe"):
        install_standin("deit_s", damaged, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "deit_s.safetensors").exists()


TINY = StandinSpec(
    "tiny_test", "deit_tiny_patch16_224",
    {"img_size": 28, "in_chans": 1, "num_classes": 10, "patch_size": 7, "embed_dim": 32, "depth": 1, "num_heads": 2,
     "mlp_ratio": 2.0, "global_pool": "avg", "class_token": False},
    epochs=1, lr=2e-3, batch_size=64, seed=0, max_shift=0, label_smoothing=0.0)
"""A test-only recipe: one epoch of a one-block model (about a second; 29% validation top-1)."""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(S.CACHE_ENV, str(tmp_path))
    return tmp_path / "standins"


@pytest.fixture
def train_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the pretraining runs (the real training still happens)."""
    calls: list[str] = []
    real = S._train_on_digits

    def counting(model, spec, digits, progress):
        calls.append(spec.arch)
        return real(model, spec, digits, progress)

    monkeypatch.setattr(S, "_train_on_digits", counting)
    return calls


def _forbid_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the stand-in was pretrained again instead of loaded from the cache")

    monkeypatch.setattr(S, "_train_on_digits", fail)


def _probe() -> torch.Tensor:
    return torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _rank1_params(model: torch.nn.Module) -> int:
    """Parameters left if every compressible linear kept rank 1 (U, V and the bias): the smallest reachable size."""
    layers = get_adapter(model).compressible_layers(model)
    dense = sum(layer.weight.numel() for layer in layers.values())
    rank1 = sum(layer.in_features + layer.out_features for layer in layers.values())
    return sum(p.numel() for p in model.parameters()) - dense + rank1


def test_registry_keys_and_families():
    from lowrank_vit.nn.adapters import timm_with_our_models

    assert list(STANDINS) == ["deit_t", "deit_s", "deit_b", "vit_b", "vit_l", "swin_b", "vmamba_t", "vmamba_s",
                              "vmamba_b"]
    for arch, spec in STANDINS.items():
        assert spec.arch == arch
        assert spec.timm_name in timm_with_our_models().list_models(), spec.timm_name
        assert "distilled" not in spec.timm_name
    assert STANDINS["deit_t"].timm_name.startswith("deit_tiny")
    assert STANDINS["deit_s"].timm_name.startswith("deit_small")
    assert STANDINS["deit_b"].timm_name.startswith("deit_base")
    assert STANDINS["vit_b"].timm_name.startswith("vit_base")
    assert STANDINS["vit_l"].timm_name.startswith("vit_large")
    assert STANDINS["swin_b"].timm_name.startswith("swin_base")
    for size in ("t", "s", "b"):  # the VMamba sizes keep the real models' block counts (K means the same)
        spec = STANDINS[f"vmamba_{size}"]
        real = timm_with_our_models().create_model(spec.timm_name, pretrained=False).build_kwargs["depths"]
        assert spec.timm_name.startswith("vmamba_") and list(spec.model_kwargs["depths"]) == real


@pytest.mark.parametrize("arch", list(STANDINS))
def test_every_standin_builds_untrained(arch: str, cache: Path):
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    from lowrank_vit.nn.vssm import VSSM

    model = build_standin(arch, pretrained=False)
    expected = SwinTransformer if arch.startswith("swin") else VSSM if arch.startswith("vmamba") else \
        VisionTransformer
    assert type(model) is expected  # not a distilled DeiT, not another family
    assert not model.training
    assert model.pretrained_cfg["architecture"] == STANDINS[arch].timm_name  # save_compressed can rebuild it
    with torch.no_grad():
        assert model(_probe()).shape == (4, 10)
    layers = get_adapter(model).compressible_layers(model)
    assert len(layers) >= 16
    total = sum(p.numel() for p in model.parameters())
    # Table 3 removes up to 77% of the whole model: rank 1 everywhere must be far below that
    assert _rank1_params(model) < 0.2 * total
    assert not cache.exists()  # pretrained=False neither reads nor writes the cache


def test_untrained_standin_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_standin("deit_t", pretrained=False)
    assert torch.equal(torch.rand(3), expected_next)
    b = build_standin("deit_t", pretrained=False)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_relative_sizes_follow_the_real_family():
    params = {arch: sum(p.numel() for p in build_standin(arch, pretrained=False).parameters()) for arch in STANDINS}
    assert params["deit_t"] < params["deit_s"] < params["deit_b"] < params["vit_l"]
    assert params["deit_b"] == pytest.approx(params["vit_b"], rel=0.05)
    assert params["swin_b"] == pytest.approx(params["deit_b"], rel=0.25)
    assert params["vit_l"] > 2 * params["vit_b"]


def test_fingerprint_changes_with_the_recipe():
    spec = STANDINS["deit_s"]
    assert spec.fingerprint() == dataclasses.replace(spec).fingerprint()
    changed = [
        dataclasses.replace(spec, epochs=spec.epochs + 1),
        dataclasses.replace(spec, lr=spec.lr * 2),
        dataclasses.replace(spec, batch_size=spec.batch_size * 2),
        dataclasses.replace(spec, seed=spec.seed + 1),
        dataclasses.replace(spec, max_shift=spec.max_shift + 1),
        dataclasses.replace(spec, model_kwargs={**spec.model_kwargs, "depth": 1}),
    ]
    prints = {spec.fingerprint(), *(c.fingerprint() for c in changed)}
    assert len(prints) == len(changed) + 1
    assert len({s.fingerprint() for s in STANDINS.values()}) == len(STANDINS)


def test_spec_validation():
    with pytest.raises(ValueError, match="epochs"):
        dataclasses.replace(TINY, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        dataclasses.replace(TINY, lr=0.0)


@pytest.mark.parametrize("name, closest", [("deit_small", "deit_s"), ("swin", "swin_b"), ("vit-l", "vit_l")])
def test_unknown_arch_names_the_closest(name: str, closest: str):
    with pytest.raises(ValueError, match=f"did you mean '{closest}'") as info:
        build_standin(name, pretrained=False)
    assert all(arch in str(info.value) for arch in STANDINS)


def test_cache_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(S.CACHE_ENV, str(tmp_path / "mine"))
    assert standin_cache_dir() == tmp_path / "mine" / "standins"
    monkeypatch.delenv(S.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert standin_cache_dir() == tmp_path / "xdg" / "lowrank_vit" / "standins"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert standin_cache_dir() == tmp_path / "home" / ".cache" / "lowrank_vit" / "standins"


@pytest.mark.parametrize("arch, mean", [("deit_s", 0.449), ("vit_b", 0.5), ("swin_b", 0.449)])
def test_digits_are_preprocessed_like_the_data_module(arch: str, mean: float):
    """Pretraining sees exactly what build_datamodule(DataConfig("mnist-5k"), model=standin) will feed later."""
    from lowrank_vit.stages.data import build_datamodule
    from lowrank_vit.stages.data_config import DataConfig

    model = build_standin(arch, pretrained=False)
    digits = S.load_digits(model)
    assert digits.preprocessing["mean"] == [pytest.approx(mean)]
    assert digits.x_train.shape == (4000, 1, 28, 28) and digits.x_val.shape == (1000, 1, 28, 28)
    dm = build_datamodule(DataConfig(name="mnist-5k", batch_size=250), model=model)
    images, labels = zip(*dm.val_dataloader(), strict=True)
    assert torch.equal(torch.cat(images), digits.x_val)
    assert torch.equal(torch.cat(labels), digits.y_val)
    assert digits.x_val.min().item() == pytest.approx(digits.background)  # black pixels


@pytest.mark.slow
def test_cache_round_trip_loads_without_training(cache: Path, train_calls: list[str],
                                                 monkeypatch: pytest.MonkeyPatch):
    first = build_standin(TINY, progress=False)
    assert train_calls == ["tiny_test"]
    assert not first.training
    assert sorted(p.name for p in cache.iterdir()) == ["tiny_test.json", "tiny_test.lock", "tiny_test.safetensors"]
    record = S.standin_record(TINY)
    assert record is not None and record["fingerprint"] == TINY.fingerprint()
    assert 0.0 <= record["top1"] <= 100.0 and record["seconds"] > 0
    assert record["top1"] > 20.0  # one epoch of a one-block model already learns something

    _forbid_training(monkeypatch)
    second = build_standin(TINY, progress=False)
    with torch.no_grad():
        assert torch.equal(first(_probe()), second(_probe()))


@pytest.mark.slow
def test_pretrain_standin_always_trains(cache: Path, train_calls: list[str]):
    build_standin(TINY, progress=False)
    model, info = S.pretrain_standin(TINY, progress=False)
    assert train_calls == ["tiny_test", "tiny_test"]
    assert set(info) >= {"top1", "seconds", "params", "fingerprint", "spec", "preprocessing"}
    assert info["params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_same_recipe_same_weights(tmp_path: Path):
    a, info_a = S.pretrain_standin(TINY, cache_dir=tmp_path / "a", progress=False)
    b, info_b = S.pretrain_standin(TINY, cache_dir=tmp_path / "b", progress=False)
    assert info_a["top1"] == info_b["top1"]
    with torch.no_grad():
        assert torch.allclose(a(_probe()), b(_probe()), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate_weights", "garbage_record", "missing_weights", "swap_weights"])
def test_damaged_cache_is_retrained_not_crashed(damage: str, cache: Path, train_calls: list[str]):
    reference = build_standin(TINY, progress=False)
    weights, record = cache / "tiny_test.safetensors", cache / "tiny_test.json"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "garbage_record":
        record.write_text("{not json")
    elif damage == "missing_weights":
        weights.unlink()
    else:  # weights of another recipe under a record that claims this one
        other = dataclasses.replace(TINY, seed=1)
        S.pretrain_standin(other, cache_dir=cache.parent / "other", progress=False)
        weights.write_bytes((cache.parent / "other" / "tiny_test.safetensors").read_bytes())
        train_calls.clear()
        train_calls.append("tiny_test")
    with pytest.warns(UserWarning, match="ignoring the cached tiny_test stand-in"):
        model = build_standin(TINY, progress=False)
    assert train_calls == ["tiny_test", "tiny_test"]
    with torch.no_grad():
        assert torch.allclose(model(_probe()), reference(_probe()), atol=1e-5)  # same recipe, same weights
    assert S.standin_record(TINY) is not None


@pytest.mark.slow
def test_stale_recipe_is_retrained(cache: Path, train_calls: list[str]):
    build_standin(TINY, progress=False)
    changed = dataclasses.replace(TINY, seed=3)
    with pytest.warns(UserWarning, match="another recipe"):
        build_standin(changed, progress=False)
    assert train_calls == ["tiny_test", "tiny_test"]
    assert S.standin_record(changed)["fingerprint"] == changed.fingerprint()
    assert S.standin_record(TINY) is None


def test_concurrent_callers_train_once(cache: Path, train_calls: list[str]):
    """Two callers at once (like two DDP ranks): the lock lets one train; the other waits, then loads."""
    results: list[torch.nn.Module] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(build_standin(TINY, progress=False))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert train_calls == ["tiny_test"]
    with torch.no_grad():
        assert torch.equal(results[0](_probe()), results[1](_probe()))
    assert not list(cache.glob("*.tmp"))  # no temporary file left behind


def test_progress_reports_where_the_cache_went(cache: Path, capsys: pytest.CaptureFixture[str]):
    build_standin(TINY, progress=True)
    err = capsys.readouterr().err
    assert str(cache / "tiny_test.safetensors") in err and "top-1" in err


@pytest.mark.slow
def test_pretraining_ignores_the_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The weights must not depend on how busy the machine is: pretraining runs on one intra-op thread whatever the
    load average says (two threads reduce the products in another order)."""
    seen: list[int] = []
    real = S._train_on_digits

    def spying(model, spec, digits, progress):
        seen.append(torch.get_num_threads())
        return real(model, spec, digits, progress)

    monkeypatch.setattr(S, "_train_on_digits", spying)
    before = torch.get_num_threads()
    states = []
    for load in (0.0, 1.9):
        monkeypatch.setattr(S, "_load_average", lambda load=load: load)
        model, info = S.pretrain_standin(TINY, cache_dir=tmp_path / str(load), progress=False)
        assert info["threads"] == S.TRAINING_THREADS == 1
        states.append(model.state_dict())
    assert seen == [1, 1]
    assert torch.get_num_threads() == before  # the caller's setting is restored
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.slow
def test_load_standin_reads_a_stored_entry_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    trained, info = S.pretrain_standin(TINY, cache_dir=tmp_path, progress=False)
    (tmp_path / "tiny_test.lock").unlink()
    listing = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    _forbid_training(monkeypatch)
    model, record = S.load_standin(TINY, tmp_path)
    assert record["fingerprint"] == info["fingerprint"] and record["top1"] == info["top1"]
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(_probe()), trained(_probe()))
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == listing  # no lock, no retraining


@pytest.mark.slow
def test_load_standin_refuses_missing_stale_and_damaged_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(FileNotFoundError, match="no tiny_test stand-in in .*tiny_test.safetensors is missing"):
        S.load_standin(TINY, tmp_path)
    S.pretrain_standin(TINY, cache_dir=tmp_path, progress=False)
    _forbid_training(monkeypatch)
    with pytest.raises(ValueError, match="cannot be used: it was trained with another recipe"):
        S.load_standin(dataclasses.replace(TINY, seed=5), tmp_path)
    weights = tmp_path / "tiny_test.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="tiny_test stand-in in .* (cannot be used|is damaged)"):
        S.load_standin(TINY, tmp_path)
    with pytest.raises(ValueError, match="unknown stand-in architecture"):
        S.load_standin("deit_x", tmp_path)
