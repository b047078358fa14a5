"""Tests of lowrank_vit/core/likelihood.py."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lowrank_vit import CompressionConfig, compress
from lowrank_vit.core.likelihood import (
    BernoulliProbabilities,
    Categorical,
    Gaussian,
    check_declares_classes,
    is_classifier,
    resolve_likelihood,
    resolve_name,
    select_output,
)
from lowrank_vit.core.loss_aware import collect_loss_statistics
from tests.helpers import DenseHeadViT, loss_aware_cfg, make_images, make_tiny_vit


class TwoLinear(nn.Module):
    """f(x) = fc2(fc1(x)): the Jacobian of the output at fc1's output is fc2's weight, whatever x."""

    def __init__(self, outputs: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x.flatten(1)))


def _grad_gram(model: nn.Module, name: str, images: torch.Tensor, **kwargs) -> torch.Tensor:
    layer = model.get_submodule(name)
    return collect_loss_statistics(model, {name: layer}, [images], images.shape[0], progress=False,
                                   **kwargs)[name].grad_gram


def test_gaussian_gram_is_the_gauss_newton_matrix_of_the_output():
    """g = J^T n with n ~ N(0, I): E[g g^T] = J^T J. For a linear map J is fc2's weight (out, in), so G at fc1's
    output tends to weight^T weight; 4,000 draws put it within 0.1 of it (entries of size ~1)."""
    torch.manual_seed(0)
    model = TwoLinear().double()
    images = torch.randn(4000, 1, 2, 3, dtype=torch.float64)
    G = _grad_gram(model, "fc1", images, likelihood="gaussian")
    J = model.fc2.weight.detach()
    torch.testing.assert_close(G, J.T @ J, rtol=0.0, atol=0.1 * float((J.T @ J).abs().max()))


def test_auto_picks_gaussian_where_the_model_declares_no_classes():
    """A model without ``num_classes`` and without a usual head name ("fc2" is none): the same G as an explicit
    "gaussian"; renamed "fc", its last layer is a classifier's head and "auto" is the categorical likelihood."""
    model = TwoLinear().double()
    images = torch.randn(64, 1, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(_grad_gram(model, "fc1", images), _grad_gram(model, "fc1", images,
                                                                           likelihood="gaussian"))

    class Classifier(TwoLinear):
        def __init__(self):
            super().__init__()
            self.fc = self.fc2
            del self.fc2

        def forward(self, x):
            return self.fc(self.fc1(x.flatten(1)))

    classifier = Classifier().double()
    torch.testing.assert_close(_grad_gram(classifier, "fc1", images),
                               _grad_gram(classifier, "fc1", images, likelihood="categorical"))
    assert resolve_likelihood(classifier, images) == "categorical"


def test_bernoulli_gram_is_p_times_one_minus_p_at_the_logits():
    """y ~ Bernoulli(sigmoid(z)) per entry: at the logits themselves E[g g^T] = E_x[diag(p (1 - p))]."""
    torch.manual_seed(1)
    model = TwoLinear().double()
    images = torch.randn(4000, 1, 2, 3, dtype=torch.float64)
    G = _grad_gram(model, "fc2", images, likelihood="bernoulli")
    with torch.no_grad():
        p = torch.sigmoid(model(images))
    torch.testing.assert_close(G, torch.diag((p * (1 - p)).mean(0)), rtol=0.0, atol=0.01)


def test_bernoulli_of_probabilities_equals_bernoulli_of_their_logits():
    """The same Fisher whether the model hands over logits or their sigmoid (the draws are the same)."""

    class Sigmoid(TwoLinear):
        def forward(self, x):
            return torch.sigmoid(super().forward(x))

    torch.manual_seed(2)
    logits = TwoLinear().double()
    probs = Sigmoid().double()
    probs.load_state_dict(logits.state_dict())
    images = torch.randn(200, 1, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(_grad_gram(probs, "fc1", images, likelihood="bernoulli-probabilities"),
                               _grad_gram(logits, "fc1", images, likelihood="bernoulli"), rtol=1e-6, atol=1e-9)


def test_gaussian_direction_sees_the_direction_alone():
    """On f / ||f||: J = (I - u u^T) / ||f|| at the output layer, so G = E[(I - u u^T) / ||f||^2] (the projection
    is idempotent); a radial change costs nothing."""
    torch.manual_seed(3)
    model = TwoLinear().double()
    images = torch.randn(4000, 1, 2, 3, dtype=torch.float64)
    G = _grad_gram(model, "fc2", images, likelihood="gaussian-direction")
    with torch.no_grad():
        f = model(images)
    norm2 = f.square().sum(1, keepdim=True)
    u = f / norm2.sqrt()
    truth = ((torch.eye(4, dtype=torch.float64) - u[:, :, None] * u[:, None, :]) / norm2[:, :, None]).mean(0)
    torch.testing.assert_close(G, truth, rtol=0.0, atol=0.1 * float(truth.abs().max()))


def test_a_callable_likelihood_gives_its_own_gradient():
    """fn(output, generator) = sum(output * n): the gradient is n, so G equals the Gaussian's from the same draws."""
    torch.manual_seed(4)
    model = TwoLinear().double()
    images = torch.randn(100, 1, 2, 3, dtype=torch.float64)

    def directions(output: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return (output * torch.randn(tuple(output.shape), generator=generator).to(output)).sum()

    torch.testing.assert_close(_grad_gram(model, "fc1", images, likelihood=directions),
                               _grad_gram(model, "fc1", images, likelihood="gaussian"), rtol=1e-6, atol=1e-9)
    report = compress(make_tiny_vit(num_classes=0), [make_images(8)],
                      CompressionConfig(reduction=0.5, likelihood=directions, progress=False))
    assert report.config["likelihood"].startswith("callable:") and "directions" in report.config["likelihood"]
    with pytest.raises(ValueError, match="was a callable, which a saved config cannot hold"):
        CompressionConfig.from_dict({"reduction": 0.5, "likelihood": report.config["likelihood"]})


@dataclass
class _Output:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor


def test_output_parts_are_chosen_by_rule_or_by_key():
    a, b = torch.zeros(2, 3), torch.ones(2, 5)
    assert select_output(a) is a
    assert select_output((a, a + 1)) is a  # a distilled DeiT's two heads: the class head
    assert select_output({"logits": b, "hidden": a}) is b
    assert select_output(OrderedDict(image_embeds=b)) is b  # a mapping's only tensor
    assert select_output(_Output(a, b), "pooler_output") is b
    assert select_output((a, b), 1) is b
    assert select_output(_Output(a, b), lambda out: out.last_hidden_state) is a
    with pytest.raises(ValueError, match=r"returns a _Output \(last_hidden_state: tensor \(2, 3\), pooler_output: "
                                         r"tensor \(2, 5\)\); more than one part could be meant: say which part the "
                                         r"loss sees with output_key"):
        select_output(_Output(a, b))
    with pytest.raises(ValueError, match=r"output_key='image_embeds' names no tensor of it"):
        select_output({"x": a, "y": b}, "image_embeds")
    with pytest.raises(ValueError, match="output_key must be"):
        CompressionConfig(reduction=0.5, output_key=1.5)


def test_auto_rule_on_a_classifier_a_backbone_and_a_dense_model():
    images = make_images(4)
    assert resolve_likelihood(make_tiny_vit(num_classes=10), images) == "categorical"
    assert resolve_likelihood(make_tiny_vit(num_classes=0), images) == "gaussian"
    assert resolve_likelihood(DenseHeadViT(), images, output_key="mask") == "gaussian"
    assert resolve_likelihood(DenseHeadViT(), images, "bernoulli", output_key="mask") == "bernoulli"


def test_a_wrapper_with_a_dense_head_compresses_under_each_likelihood():
    images = make_images(8)
    for likelihood in ("auto", "gaussian", "bernoulli"):
        model = DenseHeadViT()
        report = compress(model, [images], CompressionConfig(reduction=0.5, likelihood=likelihood, output_key="mask",
                                                             progress=False))
        assert report.config["likelihood"] == ("gaussian" if likelihood == "auto" else likelihood)
        assert report.params_after <= report.target_params
        assert torch.isfinite(model(images)["mask"]).all()


@pytest.mark.parametrize(("likelihood", "output", "message"), [
    ("auto", lambda x: torch.zeros(x.shape[0], 4, dtype=torch.long), "is torch.int64 .*floating-point tensor"),
    ("gaussian", lambda x: x.sum(dim=(0, 2, 3)), r"shape \(1,\) for a batch of \d+ images.*batch as its first"),
    ("categorical", lambda x: x[:, :1], r"categorical.*class logits.*shape \(\d+, 1, 28, 28\)"),
    ("bernoulli-probabilities", lambda x: x * 3, r"probabilities in \[0, 1\].*use 'bernoulli' for logits"),
    ("gaussian", lambda x: x * float("nan"), r"calibration batch 0: the model's output is NaN or inf"),
])
def test_an_output_the_likelihood_cannot_use_is_refused_before_any_backward(likelihood, output, message):
    """The refusal names the output's shape and the choices; no backward ran (no gradient reached any layer)."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = make_tiny_vit(num_classes=0)

        def forward(self, x):
            self.backbone(x)
            return output(x)

    backwards = []
    model = Model()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.register_full_backward_hook(lambda *args: backwards.append(1))
    with pytest.raises(ValueError, match=message):
        compress(model, [make_images(8)], CompressionConfig(reduction=0.5, likelihood=likelihood, progress=False))
    assert not backwards


@pytest.mark.parametrize("bad", [-1, 10], ids=["negative", "num-classes"])
def test_given_labels_outside_the_classes_are_a_clear_error(bad):
    """A label equal to the number of classes is the off-by-one a dataset with 1-based labels gives: named, not an
    index error from inside the cross-entropy."""
    labels = torch.arange(8) % 10
    labels[3] = bad
    with pytest.raises(ValueError, match=r"calibration batch 0: labels must lie in \[0, 10\), got"):
        compress(make_tiny_vit(num_classes=10), [(make_images(8), labels)],
                 loss_aware_cfg(reduction=0.5, fisher_labels="given"))


def test_feature_extractor_compresses_with_a_gaussian_likelihood_and_categorical_is_refused():
    report = compress(make_tiny_vit(num_classes=0), [make_images(8)], loss_aware_cfg(reduction=0.5))
    assert report.config["likelihood"] == "gaussian"
    with pytest.raises(ValueError, match="num_classes=0 \\(a feature extractor\\): use likelihood='gaussian'"):
        compress(
            make_tiny_vit(num_classes=0), [make_images(8)], loss_aware_cfg(reduction=0.5, likelihood="categorical")
        )


def test_sampled_labels_give_the_true_fisher_of_the_logits():
    """fisher_labels="sampled" draws each image's label from the model's own softmax, so G at the logits estimates
    the true Fisher E_x[diag(p) - p p^T] (the curvature of the KL to the dense model). On 4,000 images of a linear
    classifier the estimate is within 0.03 of it everywhere (measured 0.008); labels taken as the arg max instead
    are 0.09 off."""

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1))

    torch.manual_seed(0)
    model = Head().double()
    images = torch.randn(4000, 1, 2, 3, dtype=torch.float64)
    G = collect_loss_statistics(model, {"fc": model.fc}, [images], 4000, progress=False)["fc"].grad_gram
    with torch.no_grad():
        p = torch.softmax(model(images), 1)
    fisher = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    torch.testing.assert_close(G, fisher, rtol=0.0, atol=0.03)


# ------------------------------------------------------------------ the edges of every rule the likelihood decides


class _Declares(nn.Module):
    """A model that says ``num_classes`` (as every timm model does) and holds a bias-carrying layer."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.num_classes = classes
        self.body = nn.Linear(5, 3)


class _Headed(nn.Module):
    """A model of one's own without ``num_classes``: its top-level ``head`` declares the classes."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.head = nn.Linear(7, outputs)


@pytest.mark.parametrize(("model", "classifier"), [
    (_Declares(0), False), (_Declares(1), False), (_Declares(2), True), (_Declares(3), True),
    (_Headed(1), False), (_Headed(2), True), (_Headed(3), True),
], ids=["num0", "num1", "num2", "num3", "head1", "head2", "head3"])
def test_a_classifier_declares_two_classes_or_more(model, classifier):
    """``is_classifier``'s edge: one output (a one-logit or a regression head) is not a classifier, two are."""
    assert is_classifier(model) is classifier


@pytest.mark.parametrize(("classes", "width", "expected"), [
    (1, 1, "gaussian"),  # a one-logit / regression head: not class logits
    (2, 2, "categorical"),  # the smallest classifier
    (3, 3, "categorical"),
    (3, 2, "gaussian"), (3, 4, "gaussian"),  # one column fewer or more than the classes declared: not its logits
])
def test_auto_resolves_categorical_exactly_at_two_declared_classes_of_matching_width(classes, width, expected):
    output = torch.randn(5, width) + 0.5
    assert resolve_name(_Declares(classes), output, "auto") == expected
    assert resolve_name(_Declares(classes), output.unsqueeze(-1), "auto") == "gaussian"  # (B, C, 1): not logits


@pytest.mark.parametrize(("shape", "ok"), [((5, 1), False), ((5, 2), True), ((5, 3), True), ((5, 2, 1), False)])
def test_categorical_needs_two_columns_or_more(shape, ok):
    """``Categorical.check``: a (B, 1) output is refused (a softmax of one logit is constant), (B, 2) is accepted."""
    output = torch.randn(*shape) + 0.25
    if ok:
        Categorical().check(output, 5)
    else:
        with pytest.raises(ValueError, match=r"'categorical' likelihood needs class logits"):
            Categorical().check(output, 5)


@pytest.mark.parametrize(("shape", "images", "ok"), [
    ((5,), 5, False), ((5, 1), 5, True), ((4, 3), 5, False), ((6, 3), 5, False), ((5, 3), 5, True),
])
def test_an_output_needs_the_batch_first_and_one_more_dimension(shape, images, ok):
    """``Likelihood.check``: 1-D refused, 2-D accepted; a first dimension one off the batch refused."""
    output = torch.randn(*shape) - 0.5
    if ok:
        Gaussian().check(output, images)
    else:
        with pytest.raises(ValueError, match=r"needs the batch as its first dimension"):
            Gaussian().check(output, images)


@pytest.mark.parametrize(("classes", "likelihood", "refused"), [
    (0, "categorical", True), (1, "categorical", True), (2, "categorical", False), (1, "gaussian", False),
])
def test_categorical_is_refused_below_two_declared_classes(classes, likelihood, refused):
    if refused:
        with pytest.raises(ValueError, match=f"num_classes={classes}"):
            check_declares_classes(_Declares(classes), likelihood)
    else:
        check_declares_classes(_Declares(classes), likelihood)


def test_probability_maps_saturated_at_exactly_zero_or_one_are_valid():
    """``BernoulliProbabilities.check``: [0, 1] is closed; the next float32 outside either end is refused."""
    valid = torch.tensor([[0.0, 1.0, 0.3], [1.0, 0.0, 0.7]])
    BernoulliProbabilities().check(valid, 2)
    BernoulliProbabilities().check(torch.tensor([[0.0, 0.0], [0.0, 0.0]]), 2)  # all at the lower edge
    BernoulliProbabilities().check(torch.tensor([[1.0, 1.0], [1.0, 1.0]]), 2)  # all at the upper edge
    above = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))  # 1 + 2^-23
    below = torch.nextafter(torch.tensor(0.0), torch.tensor(-1.0))  # the smallest negative float32
    for bad in (above, below):
        output = valid.clone()
        output[1, 2] = bad
        with pytest.raises(ValueError, match=r"needs probabilities in \[0, 1\]"):
            BernoulliProbabilities().check(output, 2)


@pytest.mark.parametrize(("low", "high", "ok"), [(0, 6, True), (-1, 6, False), (0, 7, False), (3, 3, True)])
def test_given_labels_lie_in_zero_to_the_number_of_classes(low, high, ok):
    """``Categorical.check_target`` for 7 classes: 0 and 6 are labels, -1 and 7 are not."""
    output = torch.randn(4, 7)
    labels = torch.tensor([low, 2, high, 1])
    if ok:
        Categorical().check_target(labels, output, 0)
    else:
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, 7\), got \[{min(low, 1)}, {max(high, 2)}\]"):
            Categorical().check_target(labels, output, 0)


def test_an_output_index_key_reaches_both_ends_of_a_tuple_and_no_further():
    output = (torch.zeros(2, 3), torch.ones(2, 4), torch.full((2, 5), 2.0))
    assert select_output(output, 2).shape == (2, 5)
    assert select_output(output, -3).shape == (2, 3)
    for key in (3, -4):
        with pytest.raises(ValueError, match=f"output_key={key} names no tensor"):
            select_output(output, key)
