"""Tests of lowrank_vit/core/loss_aware.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowrank_vit import CompressionConfig, compress
from lowrank_vit.core.calibration import output_error
from lowrank_vit.core.loss_aware import collect_loss_statistics
from lowrank_vit.nn.adapters import TimmViTAdapter
from tests.helpers import _spy_on_statistics, build, loss_aware_cfg, make_images, make_tiny_vit, qkv_biased


def test_loss_statistics_without_backward_hooks_are_the_same():
    """BEiT's in-place bias add makes the pass fall back to output-gradient hooks; the same model with the q/v
    biases folded into a biased qkv layer (no in-place change, so backward hooks) gives the same statistics."""
    model, images = build("beit")
    TimmViTAdapter().call_qkv_as_module(model)
    folded = copy.deepcopy(model)
    for attn in qkv_biased(folded):
        qkv = nn.Linear(attn.qkv.in_features, attn.qkv.out_features, bias=True)
        with torch.no_grad():
            qkv.weight.copy_(attn.qkv.weight)
            qkv.bias.copy_(torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        attn.qkv, attn.q_bias, attn.v_bias = qkv, None, None
    stats = {}
    for key, net in (("fallback", model), ("hooks", folded)):
        layers = TimmViTAdapter().compressible_layers(net)
        stats[key] = collect_loss_statistics(net, layers, [images], 24, progress=False, gram_space="auto",
                                             micro_batch=8)
    assert stats["fallback"].keys() == stats["hooks"].keys()
    widening = [n for n in stats["hooks"] if stats["hooks"][n].grad_range_gram is not None]
    assert any(n.endswith("attn.qkv") for n in widening)  # the layers whose G the backward hooks form
    for name, ours in stats["fallback"].items():
        theirs = stats["hooks"][name]
        for field in ("gram", "grad_gram", "grad_range_gram", "output_gram"):
            a, b = getattr(ours, field), getattr(theirs, field)
            assert (a is None) == (b is None), (name, field)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9 * float(b.abs().max()), msg=(name, field))
        for field in ("grad_trace", "loss_scale", "input_trace"):
            a, b = getattr(ours, field), getattr(theirs, field)
            assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-6, abs=0)), (name, field)


def test_statistics_match_a_brute_force_per_token_sum():
    """H = (1/N) sum x x^T and G = 1/(N T) sum g g^T, with g from each image's own loss, one image and one token at a
    time (labels given, so both sides use the same labels). In float64, so the two orders of summation agree."""
    model = make_tiny_vit(seed=3).double()
    images = make_images(6, seed=4).double()
    labels = torch.tensor([0, 3, 7, 1, 9, 2])
    name = "blocks.1.mlp.fc1"
    layer = model.get_submodule(name)
    stats = collect_loss_statistics(model, {name: layer}, [(images[:4], labels[:4]), (images[4:], labels[4:])], 6,
                                    labels="given", progress=False)[name]
    captured = {}
    handle = layer.register_forward_hook(lambda m, i, o, c=captured: c.update(x=i[0], y=o))
    H = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64)
    G = torch.zeros(layer.out_features, layer.out_features, dtype=torch.float64)
    tokens = 0
    try:
        for i in range(6):
            logits = model(images[i: i + 1])
            loss = torch.nn.functional.cross_entropy(logits, labels[i: i + 1])
            (g,) = torch.autograd.grad(loss, captured["y"])
            for t in range(g.shape[1]):
                x_t, g_t = captured["x"][0, t].detach().double(), g[0, t].double()
                H += torch.outer(x_t, x_t)
                G += torch.outer(g_t, g_t)
            tokens = g.shape[1]
    finally:
        handle.remove()
    assert stats.tokens == tokens and stats.num_images == 6
    torch.testing.assert_close(stats.loss_scale * stats.gram, H / 6, rtol=1e-9, atol=1e-12)
    # the reported error of a weight change is the pooled relative output error over all calibration tokens
    W = layer.weight.detach().T
    delta = 0.1 * torch.randn(W.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pooled = float(torch.sum(delta * (H @ delta))) / float(torch.sum(W * (H @ W)))
    assert output_error(stats, delta) == pytest.approx(pooled, rel=1e-9)
    torch.testing.assert_close(stats.grad_gram, G / (6 * tokens), rtol=1e-9, atol=1e-15)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_lower_kl_than_the_paper_recipe_on_a_trained_model():
    """On a tiny ViT trained here for a few steps on a separable task, the loss-aware recipe changes the
    predictions less (KL to the dense model) than the paper's recipe at the same size."""
    from lowrank_vit.repro.tensortrain import train_classifier

    images = make_images(256, seed=8)
    labels = (images.mean(dim=(1, 2, 3)) > images.mean()).long() + 2 * (images[:, 0, :14].mean(dim=(1, 2)) > 0).long()
    dense = make_tiny_vit(seed=1)
    train_classifier(dense, images, labels, epochs=6, lr=3e-3, batch_size=32, seed=0, progress=False)
    dense.eval()
    with torch.no_grad():
        reference = torch.log_softmax(dense(images), 1)

    def kl(settings: dict) -> float:
        model = make_tiny_vit(seed=1)
        model.load_state_dict(dense.state_dict())
        compress(model, [images[:128]], CompressionConfig(reduction=0.6, calib_samples=128, progress=False,
                                                          **settings))
        with torch.no_grad():
            out = torch.log_softmax(model(images), 1)
        return float(torch.nn.functional.kl_div(out, reference, log_target=True, reduction="batchmean"))

    paper = kl(dict(decomposition="whitened", allocation="greedy", compensation="lowrank"))
    ours = kl(dict(decomposition="loss_aware", allocation="marginal", compensation="none"))
    assert ours < paper


def test_labels_given_without_labels_is_a_clear_error():
    with pytest.raises(ValueError, match="fisher_labels='sampled'"):
        compress(make_tiny_vit(), [make_images(8)], loss_aware_cfg(reduction=0.5, fisher_labels="given"))


def test_nan_images_and_dead_gradients_are_clear_errors():
    images = make_images(8)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compress(make_tiny_vit(), [images], loss_aware_cfg(reduction=0.5))
    model = make_tiny_vit()
    with torch.no_grad():
        model.head.weight.zero_()  # the logits no longer depend on any block: every gradient there is zero
    with pytest.raises(ValueError, match="received no loss gradient.*decomposition='whitened'"):
        compress(model, [make_images(8)], loss_aware_cfg(reduction=0.5))


@pytest.mark.parametrize("fisher_labels", ["sampled", "given"])
@pytest.mark.parametrize("grad_images", [None, 4])
def test_non_finite_values_after_the_first_micro_batch_name_where_they_start(fisher_labels, grad_images):
    """The finiteness checks read the running sums once, after the first micro-batch and after the pass: a NaN that
    starts in a later batch (past grad_images too, where no backward runs) still stops the pass, and the error names
    the first layer it reached, or the logits when only the head makes it."""
    layers = lambda m: {n: mod for n, mod in m.named_modules() if n.startswith("blocks.") and  # noqa: E731
                        isinstance(mod, torch.nn.Linear)}
    labels = torch.arange(8) % 10
    late = make_images(8, seed=1)
    late[5, 0, 3, 3] = 3e38  # finite (the loader's check lets it through); the first norm's variance overflows
    model = make_tiny_vit()
    batches = [(make_images(8), labels), (late, labels)]
    with pytest.raises(ValueError, match=r"non-finite activations \(NaN or inf\) reach layer blocks\.0\.attn\.qkv "
                                         r"during the loss-aware calibration"):
        collect_loss_statistics(model, layers(model), batches, 16, labels=fisher_labels, progress=False,
                                micro_batch=4, grad_images=grad_images)
    with torch.no_grad():
        model.head.bias[2] = float("inf")  # every block finite, the logits not
    with pytest.raises(ValueError, match=r"calibration batch 0: the model's logits are NaN or inf"):
        collect_loss_statistics(model, layers(model), batches[:1], 8, labels=fisher_labels, progress=False,
                                micro_batch=4, grad_images=grad_images)


def test_micro_batches_do_not_change_the_statistics():
    """A calibration batch is split for the backward (bounded memory): the same H, G and labels either way."""
    model = make_tiny_vit(seed=2).double()
    images = make_images(10, seed=9).double()
    labels = torch.arange(10) % 10
    layers = {n: model.get_submodule(n) for n in ("blocks.0.attn.qkv", "blocks.1.mlp.fc2")}
    whole = collect_loss_statistics(model, layers, [(images, labels)], 10, labels="given", progress=False)
    split = collect_loss_statistics(model, layers, [(images, labels)], 10, labels="given", progress=False,
                                    micro_batch=3)
    for name in layers:
        torch.testing.assert_close(split[name].grad_gram, whole[name].grad_gram, rtol=1e-10, atol=0.0)
        torch.testing.assert_close(split[name].gram, whole[name].gram, rtol=1e-10, atol=0.0)
    with pytest.raises(ValueError, match="micro_batch must be a positive integer"):
        collect_loss_statistics(model, layers, [images], 10, micro_batch=0, progress=False)


@pytest.mark.parametrize("gram_space", ["input", "auto"])
def test_centred_statistics_match_a_brute_force_centred_gram(gram_space):
    """center=True: the Grams are those of x - mu (mu: the mean token over all images), on whichever side a layer keeps
    them, and mu is recorded; G is unchanged. fc1 keeps H on its input side, fc2 W^T H W on its output side."""
    model = make_tiny_vit(seed=3).double()
    images = make_images(6, seed=4).double()
    names = ("blocks.1.mlp.fc1", "blocks.1.mlp.fc2")
    layers = {n: model.get_submodule(n) for n in names}
    batches = [images[:4], images[4:]]
    plain = collect_loss_statistics(model, layers, batches, 6, progress=False, gram_space=gram_space)
    centred = collect_loss_statistics(model, layers, batches, 6, progress=False, gram_space=gram_space, center=True)
    inputs = {}
    handles = [layers[n].register_forward_hook(lambda m, i, o, n=n: inputs.setdefault(n, []).append(i[0]))
               for n in names]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    for name in names:
        x = torch.cat(inputs[name]).reshape(-1, layers[name].in_features)
        mu = x.mean(0)
        H_c = (x - mu).T @ (x - mu) / 6
        c, p = centred[name], plain[name]
        torch.testing.assert_close(c.token_mean, mu, rtol=1e-10, atol=1e-12)
        assert c.loss_scale == pytest.approx(p.loss_scale, rel=1e-12)  # the reported errors keep one denominator
        W = layers[name].weight.detach().T
        # whatever side the layer keeps, its gram reads as H on the range of W (calibration.range_gram)
        torch.testing.assert_close(W.T @ (c.loss_scale * c.gram) @ W, W.T @ H_c @ W, rtol=1e-8, atol=1e-10)
        assert p.token_mean is None
        if p.grad_gram is not None:
            torch.testing.assert_close(c.grad_gram, p.grad_gram, rtol=1e-12, atol=0)


@pytest.mark.parametrize("gram_space", ["input", "auto"])
def test_grad_images_take_g_from_the_first_images_and_h_from_all(gram_space):
    """grad_images=k: G (or W G W^T) is exactly the statistics of the first k images alone, even when k cuts a
    micro-batch; H is that of every image."""
    model = make_tiny_vit(seed=3).double()
    images, labels = make_images(10, seed=4).double(), torch.arange(10) % 10
    layers = {n: model.get_submodule(n) for n in ("blocks.0.attn.qkv", "blocks.1.mlp.fc2")}
    kwargs = dict(labels="given", progress=False, gram_space=gram_space, micro_batch=4)
    some = collect_loss_statistics(model, layers, [(images, labels)], 10, grad_images=5, **kwargs)
    first = collect_loss_statistics(model, layers, [(images[:5], labels[:5])], 5, **kwargs)
    every = collect_loss_statistics(model, layers, [(images, labels)], 10, **kwargs)
    for name in layers:
        for field in ("grad_gram", "grad_range_gram", "grad_trace"):
            a, b = getattr(some[name], field), getattr(first[name], field)
            assert (a is None) == (b is None), field
            if a is not None:
                torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-9, atol=1e-15)
        for field in ("gram", "output_gram", "input_trace", "loss_scale"):
            a, b = getattr(some[name], field), getattr(every[name], field)
            if b is not None:
                torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-9, atol=1e-15)
        assert some[name].num_images == 10


def test_bfloat16_pass_gives_close_statistics_and_reaches_them(monkeypatch):
    """loss_pass_dtype="bfloat16" runs the pass under autocast: H and G move by bfloat16 rounding only (not zero:
    the pass really ran in bfloat16), and compress() hands the setting to the statistics."""
    model = make_tiny_vit(seed=2)
    images, labels = make_images(12, seed=9), torch.arange(12) % 10
    layers = {n: model.get_submodule(n) for n in ("blocks.0.attn.qkv", "blocks.1.mlp.fc2")}
    runs = {dtype: collect_loss_statistics(model, layers, [(images, labels)], 12, labels="given", progress=False,
                                           compute_dtype=dtype) for dtype in ("float32", "bfloat16")}
    for name in layers:
        for field in ("gram", "grad_gram"):
            exact, rounded = getattr(runs["float32"][name], field), getattr(runs["bfloat16"][name], field)
            change = float((rounded - exact).norm() / exact.norm())
            assert 0.0 < change < 0.05, (name, field, change)
    with pytest.raises(ValueError, match="compute_dtype"):
        collect_loss_statistics(model, layers, [images], 12, compute_dtype="float16", progress=False)

    seen = _spy_on_statistics(monkeypatch)
    compress(make_tiny_vit(seed=1), [make_images(8, seed=2)], loss_aware_cfg(reduction=0.5, calib_samples=8,
                                                                   loss_pass_dtype="bfloat16"))
    assert seen["compute_dtype"] == "bfloat16"
