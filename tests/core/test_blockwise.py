"""Tests of lowrank_vit/core/blockwise.py (and its wiring: ``CompressionConfig.block_reconstruction``)."""

from __future__ import annotations

import copy
import weakref

import pytest
import timm
import torch
from torch import nn

from lowrank_vit import compress
from lowrank_vit.config import CompressionConfig, recipe
from lowrank_vit.core import blockwise
from lowrank_vit.core.blockwise import (
    BlockCache,
    block_reconstruction,
    output_fisher,
    relative_error,
    trainable_parameters,
)
from lowrank_vit.nn.adapters import get_adapter
from lowrank_vit.nn.comcat import FactorizedAttention
from lowrank_vit.nn.factorized import FactorizedLinear
from tests.helpers import make_images, make_tiny_vit, make_vssm, randomize_affine_

pytestmark = pytest.mark.usefixtures("one_thread_module")

FACTORIZED = (FactorizedLinear, FactorizedAttention)

# not the library's defaults: 3 blocks, 3 heads of 8, an MLP of ratio 2, 4x4 patches of a 3-channel 24x24 image
VIT = dict(img_size=24, patch_size=4, in_chans=3, embed_dim=24, depth=3, num_heads=3, mlp_ratio=2.0, num_classes=7)


def _branches_that_matter(model: nn.Module) -> nn.Module:
    """torch's default scale (1/sqrt(fan_in)) for every linear instead of timm's std 0.02, under which a random
    block's branches are tiny beside its residual and every block's output error is near zero; random biases and
    norm affines."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
    return randomize_affine_(model)


def _vit(**overrides) -> nn.Module:
    torch.manual_seed(0)
    return _branches_that_matter(timm.create_model("vit_tiny_patch16_224", pretrained=False,
                                                   **{**VIT, **overrides}).eval())


def _swin() -> nn.Module:
    torch.manual_seed(0)
    return _branches_that_matter(timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=2, window_size=4, embed_dim=16,
        depths=(2, 2), num_heads=(2, 4), num_classes=5).eval())


def _compressed(dense: nn.Module, images: torch.Tensor, reduction: float = 0.6, **fields) -> nn.Module:
    model = copy.deepcopy(dense)
    compress(model, [images], recipe("loss-aware", reduction=reduction, calib_samples=len(images), progress=False,
                                     **fields))
    return model


def _blocks(dense: nn.Module, model: nn.Module) -> dict[str, list[str]]:
    factorized = {name for name, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    return {block: [name for name in layers if name in factorized]
            for block, layers in get_adapter(dense).layers_by_block(dense).items()}


def _reconstruct(dense: nn.Module, model: nn.Module, images: torch.Tensor, seed: int = 0, **kwargs):
    settings = dict(trainable="factors", factorized=FACTORIZED, steps=40, lr=0.1, batch_size=16, seed=seed,
                    device=torch.device("cpu"), progress=False)
    return block_reconstruction(dense, model, _blocks(dense, model), [images], **{**settings, **kwargs})


@torch.no_grad()
def _last_block_error(dense: nn.Module, model: nn.Module, images: torch.Tensor) -> float:
    """The relative squared error of the last block's output of ``model`` against ``dense``'s, each on its own
    stream: the compressed model's features before its final norm and head."""
    outputs = []
    for net in (model, dense):
        last = list(get_adapter(net).layers_by_block(dense))[-1]
        handle = net.get_submodule(last).register_forward_hook(lambda _, __, out: outputs.append(out))
        net(images)
        handle.remove()
    return float(relative_error(outputs[0], outputs[1]))


def test_reconstruction_lowers_every_blocks_error_and_the_last_blocks_output_error():
    dense, images = _vit(), make_images(64, channels=3, size=24)
    model = _compressed(dense, images)
    before = _last_block_error(dense, model, images)
    result = _reconstruct(dense, model, images)
    assert set(result.per_block) == {"blocks.0", "blocks.1", "blocks.2"}
    for name, block in result.per_block.items():
        assert block.after < 0.97 * block.before, name  # optimized on these very images: it must gain
    assert _last_block_error(dense, model, images) < 0.8 * before
    factorized = [name for name, m in model.named_modules() if isinstance(m, FactorizedLinear)]
    assert sorted(result.layer_errors) == sorted(factorized)
    assert all(0 <= err < 10 for err in result.layer_errors.values())


def test_the_first_blocks_objective_is_its_own_output_error_on_the_shared_inputs():
    # the first block sees the same inputs in both models: its objective is plain ||B_c(x) - B_d(x)||^2 / ||B_d(x)||^2
    dense, images = _vit(), make_images(32, channels=3, size=24)
    model = _compressed(dense, images)
    seen = {}
    _reconstruct(dense, model, images, steps=1, on_block=lambda name, cache: seen.setdefault(name, (
        cache.dense_in.clone(), cache.compressed_in.clone(), cache.target.clone())))
    x_d, x_c, target = seen["blocks.0"]
    assert torch.equal(x_d, x_c)
    with torch.no_grad():
        assert torch.allclose(target, dense.get_submodule("blocks.0")(x_d))


def test_blocks_called_with_a_rotary_table_are_replayed_with_it():
    """EVA-02 calls each block as block(x, rope=table): on the cached inputs the stage calls block(x) and must get
    the table too. Truth: each block's input and output captured in the whole dense model's forward, and the stage
    lowering the last block's error."""
    torch.manual_seed(0)
    dense = _branches_that_matter(timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, img_size=28, patch_size=7, swiglu_mlp=True, scale_mlp=True,
        qkv_fused=False, depth=2, embed_dim=32, num_heads=2, num_classes=5).eval())
    images = make_images(32, channels=3, size=28)
    model = _compressed(dense, images)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [dense.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: seen.setdefault(name, (args[0].clone(), out.clone())) and None)
        for name in ("blocks.0", "blocks.1")]
    with torch.no_grad():
        dense(images)
    for handle in handles:
        handle.remove()
    caches = {}
    before = _last_block_error(dense, model, images)
    _reconstruct(dense, model, images, on_block=lambda name, cache: caches.setdefault(name, (
        cache.dense_in.clone(), cache.target.clone())))
    for name, (x, out) in seen.items():
        torch.testing.assert_close(caches[name][0], x)
        torch.testing.assert_close(caches[name][1], out)  # the dense block replayed with its table
    assert _last_block_error(dense, model, images) < before


@pytest.mark.parametrize("metric", ["mse", "fisher"])
def test_the_pipeline_records_its_stage_and_lowers_the_error_it_measures(metric):
    # the plain metric lowers the last block's output error; the Fisher metric (the recipe's) weighs it by what the
    # class-token head reads, so it lowers the error of the model's output, the logits
    dense, images = _vit(), make_images(64, channels=3, size=24)
    plain = _compressed(dense, images)
    model = copy.deepcopy(dense)
    report = compress(model, [images], recipe("loss-aware-block", reduction=0.6, calib_samples=64, progress=False,
                                              block_steps=40, block_lr=0.1, block_metric=metric))
    assert report.stage_seconds["block_reconstruction"] > 0 and report.config["block_metric"] == metric
    assert report.params_after == sum(p.numel() for p in plain.parameters())  # the same ranks: the same size
    if metric == "mse":
        assert _last_block_error(dense, model, images) < 0.8 * _last_block_error(dense, plain, images)
    else:
        with torch.no_grad():
            target = dense(images)
            assert relative_error(model(images), target) < 0.8 * relative_error(plain(images), target)
    errors = [layer.output_error for layer in report.layers if layer.rank is not None]
    assert errors and all(0 <= err < 10 for err in errors)


def test_reconstruction_is_deterministic_under_a_seed():
    dense, images = _vit(), make_images(32, channels=3, size=24)
    states = []
    for seed in (3, 3, 4):
        model = _compressed(dense, images)
        _reconstruct(dense, model, images, seed=seed, steps=10)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])  # the seed draws the batches


def test_memory_holds_one_blocks_activations_at_a_time():
    """The caches of earlier blocks are freed before the next block's are in use: at every block at most the three
    tensors of its own cache are alive, however many blocks came before (weak references count them)."""
    dense, images = _vit(depth=5), make_images(32, channels=3, size=24)
    model = _compressed(dense, images)
    seen: list[weakref.ref] = []
    alive_at: list[int] = []

    def on_block(name: str, cache: BlockCache) -> None:
        assert len(cache.tensors()) == 3 and all(t.shape[0] == 32 for t in cache.tensors())
        seen.extend(weakref.ref(t) for t in cache.tensors())
        alive_at.append(len({id(t) for ref in seen if (t := ref()) is not None}))

    _reconstruct(dense, model, images, steps=2, on_block=on_block)
    assert len(alive_at) == 5 and max(alive_at) <= 3


def test_a_backbone_without_a_head_is_reconstructed():
    dense, images = _vit(num_classes=0), make_images(48, channels=3, size=24)
    model = copy.deepcopy(dense)
    plain = _compressed(dense, images)
    compress(model, [images], recipe("loss-aware-block", reduction=0.5, calib_samples=48, progress=False,
                                     block_steps=40, block_lr=0.1))
    assert model(images).shape == dense(images).shape == (48, 24)
    assert _last_block_error(dense, model, images) < _last_block_error(dense, plain, images)


@pytest.mark.parametrize("family", ["swin", "vssm"])
def test_swin_and_a_state_space_model_are_reconstructed(family):
    # Swin: the first block of a stage follows a patch merging, its inputs come again from the images; the SSM: its
    # scan's projections are the factors, its own parameters (A, D, the convolution) stay
    dense = _swin() if family == "swin" else make_vssm()
    images = make_images(48, channels=3, size=32 if family == "swin" else 24)
    model = _compressed(dense, images, reduction=0.4)
    before = _last_block_error(dense, model, images)
    result = _reconstruct(dense, model, images)
    assert result.per_block and all(b.after <= b.before for b in result.per_block.values())
    assert sum(b.after < b.before for b in result.per_block.values()) >= len(result.per_block) - 1
    assert _last_block_error(dense, model, images) < before
    assert torch.isfinite(model(images)).all()


@pytest.mark.parametrize("family", ["swin", "vssm", "tokens"])
def test_the_fisher_recipe_runs_on_every_block_kind_and_output(family):
    # Swin (a stage's first block after a patch merging), the SSM's blocks, and a ViT whose output is its tokens
    # (the Gaussian likelihood over every token): a weight for every block, finite outputs
    if family == "swin":
        dense, images = _swin(), make_images(32, channels=3, size=32)
    elif family == "vssm":
        dense, images = make_vssm(), make_images(32, channels=3, size=24)
    else:
        dense, images = _vit(num_classes=0, global_pool=""), make_images(32, channels=3, size=24)
        assert dense(images).shape == (32, 37, 24)  # every token is the output
    seen = {}
    real = blockwise.output_fisher

    def spy(*args, **kwargs):
        seen.update(real(*args, **kwargs))
        return seen

    model = copy.deepcopy(dense)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(blockwise.METRICS, "fisher", spy)
        report = compress(model, [images], recipe("loss-aware-block", reduction=0.4, calib_samples=32, progress=False,
                                                  block_steps=5))
    blocks = list(get_adapter(dense).layers_by_block(dense))
    assert sorted(seen) == sorted(blocks) and all(w is not None and torch.all(w >= 0) for w in seen.values())
    assert report.config["likelihood"] == "gaussian" or family != "tokens"
    assert model(images).shape == dense(images).shape and torch.isfinite(model(images)).all()


def test_what_each_choice_trains():
    dense, images = _vit(), make_images(16, channels=3, size=24)
    model = _compressed(dense, images)
    block = model.get_submodule("blocks.1")
    factors = {id(p) for p in trainable_parameters(block, "factors", FACTORIZED)}
    with_bias = {id(p) for p in trainable_parameters(block, "factors_bias", FACTORIZED)}
    everything = {id(p) for p in trainable_parameters(block, "block", FACTORIZED)}
    layers = [m for m in block.modules() if isinstance(m, FactorizedLinear)]
    assert factors == {id(p) for m in layers for p in (m.U, m.V)}
    assert with_bias == factors | {id(m.bias) for m in layers if m.bias is not None}
    assert everything == {id(p) for p in block.parameters()} and {id(block.norm1.weight)} <= everything - with_bias
    with pytest.raises(ValueError, match="trainable='norms' is not one of 'factors', 'factors_bias', 'block'"):
        trainable_parameters(block, "norms", FACTORIZED)


def test_a_block_it_would_worsen_gets_its_parameters_back():
    # a learning rate far too large: every block's objective would rise, so every block is restored exactly
    dense, images = _vit(), make_images(32, channels=3, size=24)
    model = _compressed(dense, images)
    before = copy.deepcopy(model.state_dict())
    result = _reconstruct(dense, model, images, steps=5, lr=1e3)
    assert all(b.reverted and b.after == b.before for b in result.per_block.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # the flags as they were


def test_the_models_are_left_in_their_modes_and_a_block_left_dense_is_only_advanced():
    dense, images = make_tiny_vit(), make_images(32)
    model = _compressed(dense, images, reduction=0.5)
    model.blocks[0] = copy.deepcopy(dense.blocks[0])  # as the allocation leaves a block whose layers all stay dense
    untouched = copy.deepcopy(model.blocks[0].state_dict())
    dense.train()
    result = _reconstruct(dense, model, images, steps=3)
    assert dense.training and not model.training
    assert list(result.per_block) == ["blocks.1"]
    assert all(torch.equal(untouched[k], v) for k, v in model.blocks[0].state_dict().items())


def test_the_fisher_metric_is_the_mean_squared_output_gradient_in_closed_form():
    # two linear "blocks" on (B, T, D) tokens and the loss sum(c * out): the gradient at the first block's output is
    # c W2 for every image (closed form), at the second's c itself; each normalized to mean 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 4))
    c = torch.randn(3, 4)
    images = [torch.randn(7, 3, 5), torch.randn(4, 3, 5)]
    weights = output_fisher(model, ["0", "1"], images, lambda out: (c * out).sum(), torch.device("cpu"),
                            micro_batch=3, progress=False)
    first = (c @ model[1].weight.detach()).pow(2)
    assert torch.allclose(weights["0"], first / first.mean(), rtol=1e-5)
    assert torch.allclose(weights["1"], c.pow(2) / c.pow(2).mean(), rtol=1e-5)
    assert model.training  # the mode it was in


def test_the_fisher_metric_ignores_what_a_class_token_classifier_never_reads():
    # the last block's patch tokens never reach a class-token head: zero weight there, all of it on the class token;
    # a block the loss does not reach at all gets None (the plain error)
    dense, images = _vit(global_pool="token"), make_images(24, channels=3, size=24)
    generator = torch.Generator().manual_seed(0)

    def sampled(out: torch.Tensor) -> torch.Tensor:
        labels = torch.multinomial(out.detach().softmax(-1), 1, generator=generator).squeeze(1)
        return nn.functional.cross_entropy(out, labels, reduction="sum")

    weights = output_fisher(dense, ["blocks.0", "blocks.2", "norm"], [images], sampled, torch.device("cpu"),
                            progress=False)
    last = weights["blocks.2"]
    assert last.shape == (37, 24) and torch.all(last[1:] == 0) and torch.all(last[0] > 0)
    assert float(last.mean()) == pytest.approx(1.0)
    assert torch.all(weights["blocks.0"][1:].sum(-1) > 0)  # an early block's patch tokens do reach it
    flat = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    assert output_fisher(flat, ["0"], [torch.randn(5, 4)], lambda out: out.detach().sum() * 0.0 + out[:, :0].sum(),
                         torch.device("cpu"), progress=False) == {"0": None}


def test_the_weighted_objective_is_the_one_reconstructed_and_the_pipeline_runs_it():
    dense, images = _vit(global_pool="token"), make_images(32, channels=3, size=24)
    model = _compressed(dense, images)
    weights = {"blocks.2": torch.rand(37, 24) + 0.5}
    caches = {}
    result = _reconstruct(dense, model, images, steps=1, lr=1e-9, weights=weights,
                          on_block=lambda name, cache: caches.setdefault(name, (cache.compressed_in, cache.target)))
    x_c, target = caches["blocks.2"]
    with torch.no_grad():  # an lr of 1e-9 leaves the block as it was: "before" in the weighted metric, by hand
        diff = (model.blocks[2](x_c) - target).double().pow(2)
    w = weights["blocks.2"].double()
    by_hand = float((w * diff).sum() / (w * target.double().pow(2)).sum())
    assert result.per_block["blocks.2"].before == pytest.approx(by_hand, rel=1e-6)
    with torch.no_grad():  # no weight: the plain error
        plain = float(relative_error(model.blocks[0](caches["blocks.0"][0]), caches["blocks.0"][1]))
    assert result.per_block["blocks.0"].before == pytest.approx(plain, rel=1e-4)
    for fields in (dict(), dict(decomposition="whitened", bias_correction=False)):  # "auto" resolved either way
        fisher = copy.deepcopy(dense)
        config = recipe("loss-aware-block", reduction=0.6, calib_samples=32, progress=False, block_steps=20,
                        block_lr=0.1, block_metric="fisher", **fields)
        report = compress(fisher, [images], config)
        assert report.config["block_metric"] == "fisher" and report.stage_seconds["block_reconstruction"] > 0
        assert torch.isfinite(fisher(images)).all()


@pytest.mark.parametrize("fields, message", [
    (dict(block_metric="kl"), "block_metric='kl' is not one of 'mse', 'fisher'"),
    (dict(block_reconstruction="all"), "block_reconstruction='all' is not one of 'none', 'factors'"),
    (dict(block_reconstruction=True), "block_reconstruction=True is not one of"),
    (dict(block_steps=0), "block_steps must be a positive integer"),
    (dict(block_batch_size=2.5), "block_batch_size must be a positive integer"),
    (dict(block_lr=0.0), "block_lr must be a finite number > 0"),
    (dict(block_lr=float("nan")), "block_lr must be a finite number > 0"),
])
def test_bad_settings_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig(reduction=0.5, progress=False, **fields)


def test_the_recipe_and_its_defaults():
    config = recipe("loss-aware-block", reduction=0.5)
    assert config.block_reconstruction == "factors" and config.block_metric == "fisher" and not config.refit
    assert CompressionConfig(reduction=0.5, block_reconstruction="factors").block_metric == "mse"  # as first written
    assert CompressionConfig(reduction=0.5).block_reconstruction == "none"  # not the default recipe
    assert CompressionConfig.from_dict(config.to_dict()) == config
