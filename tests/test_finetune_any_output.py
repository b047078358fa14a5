"""The partial fine-tune of a model whose output is not a class (a headless ViT's features, an embedding, a sigmoid
map) and of a classifier on images without labels: distillation alone, the dense teacher's outputs matched under
the compression's likelihood (each loss against a hand computation), the same trainable set, and the refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lowrank_vit import compress
from lowrank_vit.config import recipe
from lowrank_vit.stages.finetune import (
    FinetuneConfig,
    PartialFinetune,
    finetune,
    freeze_for_partial_finetune,
    images_and_labels,
    output_distillation_loss,
    resolve_finetune_likelihood,
    soft_distillation_loss,
)

from conftest import make_images, make_tiny_vit

QUIET = dict(accelerator="cpu", devices=1, progress=False, enable_model_summary=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, no oversubscription


def _compressed(num_classes: int = 0) -> tuple[nn.Module, nn.Module]:
    """A compressed tiny ViT and its dense original (the teacher)."""
    model = make_tiny_vit(seed=0, num_classes=num_classes)
    dense = copy.deepcopy(model).eval()
    compress(model, [make_images(32, seed=1)], recipe("paper", reduction=0.4, progress=False))
    return model, dense


@pytest.fixture(scope="module")
def headless() -> tuple[nn.Module, nn.Module]:
    return _compressed(0)


# ------------------------------------------------------------------------------------------- the losses by hand


def test_gaussian_is_the_mean_squared_error():
    student, teacher = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # by hand: squared differences 1, 4, 1, 4 over 4 entries
    assert float(output_distillation_loss("gaussian", student, teacher)) == pytest.approx(10 / 4)


def test_gaussian_direction_compares_the_normalized_outputs():
    student, teacher = torch.tensor([[3.0, 4.0]]), torch.tensor([[2.0, 0.0]])
    # by hand: (0.6, 0.8) against (1, 0): (0.4² + 0.8²) / 2 = 0.4; the norms do not count
    assert float(output_distillation_loss("gaussian-direction", student, teacher)) == pytest.approx(0.4)
    assert float(output_distillation_loss("gaussian-direction", 5 * teacher, teacher)) == pytest.approx(0.0, abs=1e-12)


def test_bernoulli_is_the_cross_entropy_against_the_teachers_sigmoid():
    student, teacher = torch.tensor([[2.0, 0.0]]), torch.tensor([[-1.0, 0.0]])

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    q = sigmoid(-1.0)
    first = -(q * math.log(sigmoid(2.0)) + (1 - q) * math.log(1 - sigmoid(2.0)))
    second = math.log(2.0)  # both at 0: p = q = 1/2
    assert float(output_distillation_loss("bernoulli", student, teacher)) == pytest.approx((first + second) / 2)


def test_bernoulli_probabilities_is_the_cross_entropy_of_the_probabilities():
    student, teacher = torch.tensor([[0.8, 0.5]]), torch.tensor([[0.3, 0.5]])
    first = -(0.3 * math.log(0.8) + 0.7 * math.log(0.2))
    assert float(output_distillation_loss("bernoulli-probabilities", student, teacher)) == pytest.approx(
        (first + math.log(2.0)) / 2, rel=1e-5)


def test_categorical_is_the_tempered_kl():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    assert torch.equal(output_distillation_loss("categorical", student, teacher, 2.0),
                       soft_distillation_loss(student, teacher, 2.0))


def test_the_gaussian_gradient_pulls_the_student_toward_the_teacher():
    student = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 2.0, 5.0]])
    output_distillation_loss("gaussian", student, teacher).backward()
    assert student.grad.tolist()[0] == pytest.approx([2 * 1 / 3, 0.0, 2 * -2 / 3])  # 2 (s - t) / entries


def test_bad_losses_are_refused():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="no distillation loss for the likelihood 'poisson'"):
        output_distillation_loss("poisson", x, x)
    with pytest.raises(ValueError, match="differ in shape"):
        output_distillation_loss("gaussian", x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="softens class logits only"):
        output_distillation_loss("gaussian", x, x, temperature=2.0)


def test_the_likelihood_a_finetune_uses():
    assert resolve_finetune_likelihood(make_tiny_vit(), None) == "categorical"
    assert resolve_finetune_likelihood(make_tiny_vit(num_classes=0), "auto") == "gaussian"
    assert resolve_finetune_likelihood(make_tiny_vit(num_classes=0), "bernoulli") == "bernoulli"
    with pytest.raises(ValueError, match="callable"):
        resolve_finetune_likelihood(make_tiny_vit(), "callable:mine.fn")


def test_a_batch_may_come_without_labels():
    x, y = torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])
    assert images_and_labels(x) == (x, None)
    assert images_and_labels([x])[1] is None and images_and_labels((x, y))[1] is y
    assert images_and_labels({"image": x})[1] is None and images_and_labels({"image": x, "label": y})[1] is y
    with pytest.raises(TypeError, match="batch"):
        images_and_labels({"nothing": x})


# ---------------------------------------------------------------------------------------- the LightningModule


def test_a_headless_model_distils_its_features_under_the_gaussian_likelihood(headless):
    model, dense = headless
    module = PartialFinetune(copy.deepcopy(model), FinetuneConfig(distill=1.0), teacher=dense)
    assert module.likelihood == "gaussian" and not module.categorical
    images = make_images(6, seed=3)
    module.model.train()
    loss, output = module._train_loss(images, None)
    with torch.no_grad():
        student, teacher = module.model(images), dense(images)
    assert output.shape == (6, 32)
    assert float(loss.detach()) == pytest.approx(float(((student - teacher) ** 2).mean()), rel=1e-5)
    direction = PartialFinetune(copy.deepcopy(model), FinetuneConfig(distill=1.0), teacher=dense,
                                likelihood="gaussian-direction")
    direction.model.train()
    loss, _ = direction._train_loss(images, None)
    unit = nn.functional.normalize
    expected = ((unit(student, dim=-1) - unit(teacher, dim=-1)) ** 2).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    # the trainable set is the partial fine-tune's: norms, biases, patch embedding (the head is an Identity here)
    groups = freeze_for_partial_finetune(copy.deepcopy(model))["groups"]
    assert module.trainable["groups"] == groups and groups["head"] == 0 and groups["patch_embed"] > 0


def test_a_headless_model_without_distill_1_or_a_teacher_is_refused(headless):
    model, dense = headless
    for config, teacher in ((FinetuneConfig(), dense), (FinetuneConfig(distill=0.5), dense),
                            (FinetuneConfig(distill=1.0), None)):
        with pytest.raises(ValueError, match="learns from the dense model alone: set distill=1"):
            PartialFinetune(copy.deepcopy(model), config, teacher=teacher)
    with pytest.raises(ValueError, match="softens class logits only"):
        PartialFinetune(copy.deepcopy(model), FinetuneConfig(distill=1.0, distill_temperature=2.0), teacher=dense)
    with pytest.raises(ValueError, match="at least 2 classes"):
        PartialFinetune(copy.deepcopy(model), FinetuneConfig(distill=1.0), teacher=dense, likelihood="categorical")


def test_finetune_trains_a_headless_model_on_images_alone(headless):
    model, dense = copy.deepcopy(headless[0]), headless[1]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images = TensorDataset(make_images(16, seed=4))  # items (image,): batches without labels
    module, trainer = finetune(model, DataLoader(images, batch_size=8), DataLoader(images, batch_size=8),
                               config=FinetuneConfig(epochs=1, lr=1e-3, distill=1.0), teacher=dense, max_steps=2,
                               **QUIET)
    assert trainer.global_step == 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= {n for n, p in model.named_parameters() if p.requires_grad}
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])
    assert "val/top1" not in metrics and module.hparams["likelihood"] == "gaussian"


class _Images(Dataset):
    """Bare image tensors (an unlabelled image folder's items)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def test_a_classifier_on_images_without_labels_learns_the_teachers_predictions():
    model, dense = _compressed(10)
    images = make_images(8, seed=5)
    module = PartialFinetune(copy.deepcopy(model), FinetuneConfig(distill=1.0, distill_temperature=2.0),
                             teacher=dense)
    assert module.categorical
    module.model.train()
    loss, logits = module._train_loss(images, None)
    with torch.no_grad():
        target = dense(images)
    assert float(loss.detach()) == pytest.approx(float(soft_distillation_loss(logits, target, 2.0)), rel=1e-5)
    mixed = PartialFinetune(copy.deepcopy(model), FinetuneConfig(distill=0.5), teacher=dense)
    with pytest.raises(ValueError, match="a batch without labels: the cross-entropy needs them"):
        mixed._train_loss(images, None)
    trained, trainer = finetune(copy.deepcopy(model), DataLoader(_Images(images), batch_size=4),
                                DataLoader(_Images(images), batch_size=4), config=FinetuneConfig(epochs=1,
                                                                                                 distill=1.0),
                                teacher=dense, **QUIET)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["val/loss"])
    assert "val/top1" not in trainer.callback_metrics and "train/top1" not in trainer.callback_metrics
