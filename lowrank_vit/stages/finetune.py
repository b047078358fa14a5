"""Partial fine-tuning of a compressed model (paper Section 4.1, item 5) as a Lightning stage.

The paper fine-tunes "the uncompressed parameters of the model, including the LayerNorm parameters, head, biases, and
the patch embedding module" for 20 epochs at lr 1e-4 with a cosine schedule, "almost 2% of the network parameters",
while the weight matrices (here U, V and Z) stay frozen. :func:`freeze_for_partial_finetune` is that choice, made
explicit in one function:

* trained: the parameters of every normalization module (LayerNorm and timm's other norms), every bias (a parameter
  named ``bias`` or ``*_bias``, the factorized layers' biases included), the classifier head(s) (timm's
  ``pretrained_cfg["classifier"]``: ``head``, distilled DeiT's ``head_dist``, Swin's ``head.fc``) and the whole patch
  embedding module;
* frozen: U, V and Z of every factorized layer, any linear left dense inside the blocks, Swin's patch merging
  reductions and relative position bias tables (a table of attention logits, not a bias of a layer), and the
  positional embedding and class/distillation tokens. The paper's list does not name the tokens; ``train_tokens=True``
  adds them (DeiT-B: 152,064 more parameters).

Distilled DeiT (timm's ``VisionTransformerDistilled``): the model is put in distilled-training mode, so in training
it returns (class-head logits, distillation-head logits). Without a teacher both heads learn the labels and the loss
is the mean of their cross-entropies (DeiT's hard-distillation loss with the true labels standing in for the
teacher's); with a ``teacher`` the distillation head learns the teacher's argmax (DeiT's hard distillation). In
evaluation the model returns the average of the two heads' logits, as timm does, and accuracy is measured on that.

Distillation from the dense model (``FinetuneConfig.distill`` > 0, beyond the paper): the loss mixes the
cross-entropy above with :func:`soft_distillation_loss` against the predictions of a ``teacher``, the model before
compression, so the fine-tune pulls the compressed model back toward the predictions it is meant to keep rather than
only toward the labels (a distilled DeiT's two heads each learn the teacher's predictions).

A model whose output is not a class (a backbone's features, an embedding, a dense map: ``num_classes`` 0) and a
classifier given images without labels fine-tune by distillation alone (``distill=1``): the loss is
:func:`output_distillation_loss`, the dense teacher's outputs matched under the likelihood the compression used
(:mod:`lowrank_vit.core.likelihood`): the squared error for "gaussian", of the L2-normalized outputs for
"gaussian-direction", the binary cross-entropy against the teacher's probabilities for "bernoulli" (logits) and
"bernoulli-probabilities", the KL above for "categorical". The trainable set is the same.
"""

from __future__ import annotations

import json
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lowrank_vit.core.common import IMAGE_KEYS, LABEL_KEYS, batch_images, batch_labels, warmup_cosine
from lowrank_vit.core.likelihood import AUTO, OutputKey, is_classifier, select_output
from lowrank_vit.core.progress import lightning_progress_callbacks
from lowrank_vit.nn.adapters import TimmViTAdapter, count_params
from lowrank_vit.nn.factorized import FactorizedLinear
from lowrank_vit.stages.finetune_config import FinetuneConfig, check_precision_on

_ADAPTER = TimmViTAdapter()  # names the heads, the patch embedding and the tokens


def _is_norm(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    if hasattr(nn, "RMSNorm"):
        norm_types = norm_types + (nn.RMSNorm,)
    return isinstance(module, norm_types) or type(module).__name__.lower().endswith("norm") or \
        type(module).__name__.endswith(("Norm2d", "NormAct", "NormAct2d"))


def has_factorized_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds at least one :class:`FactorizedLinear` (i.e. was compressed)."""
    return any(isinstance(m, FactorizedLinear) for m in model.modules())


def freeze_for_partial_finetune(model: nn.Module, *, train_tokens: bool = False, train_factors: bool = False,
                                require_factorized: bool = True) -> dict[str, Any]:
    """Set ``requires_grad`` for the paper's partial fine-tuning and count what trains. Changes nothing else.

    Args:
        model: a compressed timm vision transformer.
        train_tokens: also train the positional embedding and the class/distillation/register tokens (not in the
            paper's list; see the module docstring).
        train_factors: also train the factorized layers' U, V and Z and the weights of every linear layer left
            dense (beyond the paper, whose fine-tune keeps them frozen; see ``FinetuneConfig.train_factors``).
        require_factorized: raise when the model has no factorized layer (default). ``False`` allows counting a
            dense model's fraction for reference.

    Returns:
        ``{"trainable": int, "total": int, "fraction": float, "groups": {"head": n, "patch_embed": n, "norm": n,
        "bias": n, "tokens": n, "factors": n}}``; every trainable parameter is counted in the first group that
        claims it.

    Raises:
        ValueError: the model holds no :class:`FactorizedLinear` (and ``require_factorized``).
    """
    if require_factorized and not has_factorized_layers(model):
        raise ValueError(f"{type(model).__name__} has no factorized (U V^T + Z) layer: partial fine-tuning trains only "
                         "norms, biases, head and patch embedding of a compressed model. Compress it first "
                         "(lowrank_vit.compress) or load a compressed one (lowrank_vit.load_compressed).")
    groups: dict[str, set[int]] = {"head": set(), "patch_embed": set(), "norm": set(), "bias": set(), "tokens": set(),
                                   "factors": set()}
    for name in _ADAPTER.classifier_names(model):
        groups["head"].update(id(p) for p in model.get_submodule(name).parameters())
    patch_embed = _ADAPTER.patch_embedding(model)
    if patch_embed is not None:
        groups["patch_embed"].update(id(p) for p in patch_embed.parameters())
    if train_tokens:
        groups["tokens"].update(id(p) for p in _ADAPTER.token_parameters(model).values())
    for module in model.modules():
        if _is_norm(module):
            groups["norm"].update(id(p) for p in module.parameters(recurse=False))
        if train_factors and isinstance(module, (FactorizedLinear, nn.Linear)):
            groups["factors"].update(id(p) for p in module.parameters())
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias" or leaf.endswith("_bias"):
            groups["bias"].add(id(p))

    counts = dict.fromkeys(groups, 0)
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        group = next((g for g, ids in groups.items() if id(p) in ids), None)
        p.requires_grad_(group is not None)
        if group is not None:
            counts[group] += p.numel()
    trainable, total = sum(counts.values()), count_params(model)
    return {"trainable": trainable, "total": total, "fraction": trainable / total, "groups": counts}


def soft_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T² KL(softmax(teacher / T) || softmax(student / T))``, averaged over the images (Hinton et al.'s
    distillation term; the T² keeps its gradient's scale independent of T). At T = 1 it is the KL divergence of the
    compressed model's predictions from the dense model's, the quantity the loss-aware compression minimizes to
    second order; its gradient with respect to the student's logits is ``softmax(student) - softmax(teacher)``."""
    t = float(temperature)
    log_student = nn.functional.log_softmax(student.float() / t, dim=-1)
    log_teacher = nn.functional.log_softmax(teacher.float() / t, dim=-1)
    return nn.functional.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * (t * t)


DISTILLATION_LIKELIHOODS = ("categorical", "gaussian", "gaussian-direction", "bernoulli", "bernoulli-probabilities")
"""The likelihoods :func:`output_distillation_loss` matches a teacher's outputs under (the registered ones of
:mod:`lowrank_vit.core.likelihood`)."""
_PROBABILITY_EPS = 1e-6  # as the 'bernoulli-probabilities' likelihood: probabilities clamped away from 0 and 1


def output_distillation_loss(likelihood: str, student: torch.Tensor, teacher: torch.Tensor,
                             temperature: float = 1.0) -> torch.Tensor:
    """The distillation term for an output under ``likelihood``, averaged over every entry of the batch:
    * "categorical": :func:`soft_distillation_loss` (``temperature`` applies to it alone);
    * "gaussian": the mean squared error ``mean((student - teacher)²)``;
    * "gaussian-direction": the same of both outputs L2-normalized along their last dimension;
    * "bernoulli": the binary cross-entropy of the student's logits against the teacher's ``sigmoid``;
    * "bernoulli-probabilities": the binary cross-entropy of the student's probabilities (clamped to
      [1e-6, 1 - 1e-6], as the likelihood does) against the teacher's probabilities.

    Raises:
        ValueError: another likelihood, outputs of different shapes, or a temperature other than 1 with a
            likelihood that has none.
    """
    if likelihood not in DISTILLATION_LIKELIHOODS:
        raise ValueError(f"no distillation loss for the likelihood {likelihood!r}; the fine-tune distils under "
                         f"{', '.join(DISTILLATION_LIKELIHOODS)}")
    if student.shape != teacher.shape:
        raise ValueError(f"the student's output {tuple(student.shape)} and the teacher's {tuple(teacher.shape)} "
                         f"differ in shape: they cannot be matched")
    if likelihood == "categorical":
        return soft_distillation_loss(student, teacher, temperature)
    if float(temperature) != 1.0:
        raise ValueError(f"distill_temperature={temperature} softens class logits only; the {likelihood!r} "
                         f"likelihood has no temperature: leave it at 1")
    F = nn.functional
    s, t = student.float(), teacher.detach().float()
    if likelihood == "gaussian":
        return F.mse_loss(s, t)
    if likelihood == "gaussian-direction":
        return F.mse_loss(F.normalize(s, dim=-1, eps=1e-12), F.normalize(t, dim=-1, eps=1e-12))
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(s, torch.sigmoid(t))
    return F.binary_cross_entropy_with_logits(torch.logit(s, eps=_PROBABILITY_EPS), t.clamp(0.0, 1.0))


def resolve_finetune_likelihood(model: nn.Module, likelihood: str | None) -> str:
    """The likelihood a fine-tune of ``model`` distils under: ``likelihood`` where given (a compression's recorded
    one), else ("auto" or None) "categorical" for a model that declares two classes or more, "gaussian" otherwise
    (as :func:`lowrank_vit.core.likelihood.resolve_name` decides it for a compression)."""
    if likelihood is None or likelihood == AUTO:
        return "categorical" if is_classifier(model) else "gaussian"
    if not isinstance(likelihood, str) or likelihood not in DISTILLATION_LIKELIHOODS:
        raise ValueError(f"the fine-tune distils under {', '.join(DISTILLATION_LIKELIHOODS)}, not {likelihood!r} "
                         f"(a likelihood given as a callable is not recorded with the model)")
    return likelihood


def distillation_mix(cross_entropy: torch.Tensor, distillation: torch.Tensor, weight: float) -> torch.Tensor:
    """``FinetuneConfig.distill``'s loss: ``(1 - weight)`` cross-entropy plus ``weight`` distillation (the latter alone
    at weight 1, so a label-free loss does not carry a zero-weighted term)."""
    return distillation if weight == 1 else (1 - weight) * cross_entropy + weight * distillation


def images_and_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels or None) of a batch: an ``(images, labels)`` pair, a dict with an image key (and a label
    key), or, unlabelled, a bare image tensor or a dict without a label key."""
    images = batch_images(batch)
    if images is None:
        raise TypeError(f"a batch must be an image tensor, an (images, labels) pair or a dict with an image key "
                        f"{IMAGE_KEYS}, got {type(batch).__name__}")
    return images, (None if isinstance(batch, torch.Tensor) else batch_labels(batch))


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a batch: an ``(images, labels)`` pair or a dict with image and label keys."""
    images, labels = batch_images(batch), batch_labels(batch)
    if isinstance(batch, torch.Tensor) or images is None or labels is None:
        raise TypeError(f"a fine-tuning batch must be an (images, labels) pair or a dict with an image key "
                        f"{IMAGE_KEYS} and a label key {LABEL_KEYS}, got {type(batch).__name__}")
    return images, labels


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What a fine-tuning checkpoint must agree on with the model it is loaded into."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {"architecture": cfg.get("architecture", type(model).__name__),
            "layers": {fqn: m.spec() for fqn, m in model.named_modules() if isinstance(m, FactorizedLinear)}}


class PartialFinetune(L.LightningModule):
    """Fine-tunes a compressed model's norms, biases, head(s) and patch embedding (Section 4.1, item 5).

    AdamW over the trainable parameters only, learning rate per step on a (warm-up +) cosine schedule spanning the
    whole run, cross-entropy; logs ``train/loss``, ``val/loss``, ``val/top1``, ``val/top5`` (and ``test/*``) with
    torchmetrics (top-5 becomes top-``num_classes`` for fewer than 5 classes). A model whose output is not a class
    (``likelihood`` other than "categorical") and a classifier's batches without labels learn from the teacher
    alone (``distill=1``, :func:`output_distillation_loss`); ``train/loss`` and ``val/loss`` are then that loss.
    """

    def __init__(self, model: nn.Module, config: FinetuneConfig | None = None, *,
                 teacher: nn.Module | None = None, likelihood: str | None = None,
                 output_key: OutputKey = None) -> None:
        """Args:
            model: the compressed timm model (frozen here as :func:`freeze_for_partial_finetune` says).
            config: the settings; default :class:`FinetuneConfig()`.
            teacher: the model before compression, frozen: the target of the distillation term when
                ``config.distill`` > 0, and of a distilled DeiT's distillation head (hard distillation) when it is 0.
            likelihood: what the model's output is (:func:`resolve_finetune_likelihood`; the compression's recorded
                one): None or "auto", "categorical" for a classifier (its cross-entropy and KL, as ever), "gaussian"
                for any other model; "gaussian-direction", "bernoulli" or "bernoulli-probabilities" where the
                compression used them. Any but "categorical" fine-tunes by distillation alone.
            output_key: which part of the model's output the distillation loss sees (as
                ``CompressionConfig.output_key``; :func:`~lowrank_vit.core.likelihood.select_output`).

        Raises:
            ValueError: the model has no factorized layer; "categorical" for a model with fewer than 2 classes;
                ``config.distill`` > 0 without a teacher; another likelihood without ``distill=1`` and a teacher.
        """
        super().__init__()
        self.config = config or FinetuneConfig()
        self.model = model
        self.trainable = freeze_for_partial_finetune(model, train_tokens=self.config.train_tokens,
                                                     train_factors=self.config.train_factors)
        self.likelihood = resolve_finetune_likelihood(model, likelihood)
        self.output_key = output_key
        self.categorical = self.likelihood == "categorical"
        num_classes = getattr(model, "num_classes", None)
        if self.categorical and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"the model must be a classifier with at least 2 classes (num_classes={num_classes!r})")
        if not self.categorical and (self.config.distill != 1 or teacher is None):
            raise ValueError(f"a model whose output is not a class (likelihood {self.likelihood!r}, num_classes="
                             f"{num_classes!r}) learns from the dense model alone: set distill=1 and pass the model "
                             f"before compression as teacher=...")
        if not self.categorical:
            output_distillation_loss(self.likelihood, torch.zeros(1, 1), torch.zeros(1, 1),
                                     self.config.distill_temperature)  # a temperature it has none of: refused now
        self.num_classes = num_classes if self.categorical else 0
        self.distilled = self.categorical and _ADAPTER.is_distilled(model)
        if self.distilled:
            model.set_distilled_training(True)
        if self.config.distill > 0 and teacher is None:
            raise ValueError(f"distill={self.config.distill} needs a teacher: pass the model before compression as "
                             "teacher=..., or set distill=0 (the paper's cross-entropy alone)")
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []  # not a submodule
        self._fingerprint = model_fingerprint(model)
        self.save_hyperparameters({"finetune": self.config.to_dict(), "model": self._fingerprint["architecture"],
                                   "trainable_params": self.trainable["trainable"],
                                   "total_params": self.trainable["total"],
                                   "trainable_fraction": self.trainable["fraction"],
                                   "trainable_groups": self.trainable["groups"], "distilled": self.distilled,
                                   "teacher": teacher is not None, "likelihood": self.likelihood})
        if not self.categorical:
            return
        top5 = min(5, num_classes)
        # "micro": the fraction of images right, what top-1 means (torchmetrics' default, "macro", averages the
        # classes' recalls, which differs on an imbalanced split)
        self.train_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.test_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        if not self.categorical:
            return select_output(out, self.output_key)
        return (out[0] + out[1]) / 2 if isinstance(out, tuple) else out

    @torch.no_grad()
    def _teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        out = self._teacher[0](images)  # in eval mode: a distilled DeiT teacher returns its heads' average
        if not self.categorical:
            return select_output(out, self.output_key)
        return out[0] if isinstance(out, tuple) else out

    def _check_labels(self, labels: torch.Tensor | None) -> None:
        if labels is None and self.categorical and self.config.distill != 1:
            raise ValueError(f"a batch without labels: the cross-entropy needs them (distill={self.config.distill}); "
                             f"images without labels fine-tune by distillation alone, distill=1")

    def _train_loss(self, images: torch.Tensor,
                    labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        cfg = self.config
        if not self.categorical:  # a backbone, an embedding, a map: the teacher's outputs under the likelihood
            student = select_output(out, self.output_key)
            loss = output_distillation_loss(self.likelihood, student, self._teacher_logits(images),
                                            cfg.distill_temperature)
            return loss, student.detach()
        self._check_labels(labels)
        smoothing = cfg.label_smoothing
        heads = out if isinstance(out, tuple) else (out,)  # distilled DeiT in training: (class, distillation) heads
        teacher = self._teacher_logits(images) if self._teacher and (cfg.distill > 0 or len(heads) == 2) else None
        if labels is None:  # distill == 1 (checked): the teacher's predictions are the whole loss
            ce = None
        elif len(heads) == 2:
            logits, logits_dist = heads
            dist_target = labels if teacher is None or cfg.distill > 0 else teacher.argmax(dim=-1)
            ce = 0.5 * nn.functional.cross_entropy(logits, labels, label_smoothing=smoothing) + \
                0.5 * nn.functional.cross_entropy(logits_dist, dist_target, label_smoothing=smoothing)
        else:
            ce = nn.functional.cross_entropy(out, labels, label_smoothing=smoothing)
        loss = ce
        if cfg.distill > 0:
            kd = sum(soft_distillation_loss(h, teacher, cfg.distill_temperature) for h in heads) / len(heads)
            loss = distillation_mix(ce, kd, cfg.distill)
        return loss, (sum(heads) / len(heads)).detach()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = images_and_labels(batch)
        loss, logits = self._train_loss(images, labels)
        n = images.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        if self.categorical and labels is not None:
            self.train_top1(logits, labels)
            self.log("train/top1", self.train_top1, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        images, labels = images_and_labels(batch)
        if not self.categorical or labels is None:  # the distance to the teacher, the loss trained on
            self._check_labels(labels)
            output = self(images)
            loss = output_distillation_loss(self.likelihood, output, self._teacher_logits(images),
                                            self.config.distill_temperature)
            self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=images.shape[0],
                     sync_dist=True)
            return
        logits = self(images)
        loss = nn.functional.cross_entropy(logits, labels)
        top1, top5 = getattr(self, f"{stage}_top1"), getattr(self, f"{stage}_top5")
        top1(logits, labels)
        top5(logits, labels)
        n = labels.shape[0]
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=n, sync_dist=True)
        self.log(f"{stage}/top1", top1, on_epoch=True, prog_bar=True, batch_size=n)
        self.log(f"{stage}/top5", top5, on_epoch=True, batch_size=n)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _teacher_to_device(self) -> None:
        for teacher in self._teacher:
            teacher.to(self.device)

    def on_fit_start(self) -> None:
        self._teacher_to_device()
        # Lightning keeps submodules in the mode it finds them; a model handed over in eval mode would otherwise
        # train with eval behaviour (no dropout, and distilled DeiT returning the averaged heads). Validation still
        # switches to eval and back.
        self.model.train()

    def on_validation_start(self) -> None:
        self._teacher_to_device()

    def on_test_start(self) -> None:
        self._teacher_to_device()

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to fine-tune: no parameter requires a gradient")
        decay = [p for p in params if p.ndim >= 2 and cfg.weight_decay > 0]
        no_decay = [p for p in params if not (p.ndim >= 2 and cfg.weight_decay > 0)]
        groups = [{"params": no_decay, "weight_decay": 0.0}]
        if decay:
            groups.append({"params": decay, "weight_decay": cfg.weight_decay})
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        if not 0 < total < 2**62:
            raise ValueError("the fine-tuning needs a finite number of steps (set max_epochs or max_steps)")
        floor, warmup = cfg.min_lr / cfg.lr, cfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup, floor))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lowrank_vit"] = self._fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint written for another model, with a message that says how they differ."""
        saved = checkpoint.get("lowrank_vit")
        if not isinstance(saved, dict):
            raise ValueError("this checkpoint was not written by lowrank_vit's PartialFinetune (no 'lowrank_vit' "
                             "entry): cannot resume from it")
        mine = self._fingerprint
        if saved.get("architecture") != mine["architecture"]:
            raise ValueError(f"the checkpoint is of a {saved.get('architecture')!r} model, this is a "
                             f"{mine['architecture']!r}: wrong checkpoint")
        if saved.get("layers") != mine["layers"]:
            theirs, ours = saved.get("layers") or {}, mine["layers"]
            diff = sorted(n for n in set(theirs) | set(ours) if theirs.get(n) != ours.get(n))
            detail = "; ".join(f"{n}: checkpoint {json.dumps(theirs.get(n))}, model {json.dumps(ours.get(n))}"
                               for n in diff[:3])
            raise ValueError(f"the checkpoint was written for a model compressed differently ({len(diff)} factorized "
                             f"layer(s) differ: {detail})")
        state = checkpoint.get("state_dict") or {}
        expected = self.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        bad_shape = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
        if missing or unexpected or bad_shape:
            raise ValueError(f"the checkpoint does not match this model: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}, shape mismatch {bad_shape[:3]}")


def finetune(model: nn.Module, train_dataloaders: Any = None, val_dataloaders: Any = None, *, datamodule: Any = None,
             config: FinetuneConfig | None = None, teacher: nn.Module | None = None, logger: Any = None,
             checkpoint_dir: str | None = None, ckpt_path: str | None = None, accelerator: str = "auto",
             devices: Any = "auto", num_nodes: int = 1, strategy: Any = "auto", callbacks: list | None = None,
             progress: bool = True, likelihood: str | None = None, output_key: OutputKey = None,
             **trainer_kwargs: Any) -> tuple[PartialFinetune, L.Trainer]:
    """Run the partial fine-tuning with a plain Lightning Trainer; the model is trained in place.

    Args:
        model: the compressed model.
        train_dataloaders, val_dataloaders, datamodule: the data, as ``Trainer.fit`` takes it.
        config: :class:`FinetuneConfig` (epochs, lr, ...).
        teacher: the model before compression (frozen): needed when ``config.distill`` > 0; without distillation a
            distilled DeiT's distillation head learns its argmax.
        logger: a Lightning logger (e.g. :func:`lowrank_vit.stages.logging_utils.make_logger`) or None for none.
        checkpoint_dir: write checkpoints there (every epoch, ``last.ckpt``, and every
            ``config.checkpoint_every_n_steps`` steps if set); None writes none.
        ckpt_path: resume from this checkpoint (``"last"``: the newest in ``checkpoint_dir``, a fresh start if
            there is none). Epoch-end checkpoints resume exactly. From a mid-epoch one Lightning restarts the
            interrupted epoch's data at its first batch while the step count, optimizer and schedule continue, so the
            result differs from an uninterrupted run (measured in the tests). A stateful loader does not help here:
            Lightning 2.6 drops its saved position when ``configure_optimizers`` reads
            ``estimated_stepping_batches``, which the cosine schedule does.
        accelerator, devices, num_nodes, strategy: as ``lightning.Trainer`` (``strategy="ddp"`` for multi-GPU,
            SLURM or torchrun launches).
        callbacks: extra callbacks.
        progress: show the progress bar.
        likelihood, output_key: what the model's output is and which part of it the loss sees
            (:class:`PartialFinetune`): None for a classifier; for another model the compression's recorded
            likelihood, with ``config.distill=1`` and a ``teacher``.
        trainer_kwargs: any other ``lightning.Trainer`` argument (``max_steps``, ``limit_train_batches``, ...).

    Returns:
        The trained :class:`PartialFinetune` and its Trainer.
    """
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar

    cfg = config or FinetuneConfig()
    if "precision" not in trainer_kwargs:
        on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
        check_precision_on(cfg.precision, "cpu" if on_cpu else "cuda")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = PartialFinetune(model, cfg, teacher=teacher, likelihood=likelihood, output_key=output_key)
    callbacks = list(callbacks or [])
    if not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks += lightning_progress_callbacks(progress)
    if checkpoint_dir is not None:
        # the newest epoch only (and last.ckpt): resuming needs no more, and one file per epoch filled disks
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="epoch{epoch:03d}", save_last=True,
                                         save_top_k=1, every_n_epochs=1, auto_insert_metric_name=False))
        if cfg.checkpoint_every_n_steps:
            callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="step{step:08d}", save_last=True,
                                             save_top_k=1, every_n_train_steps=cfg.checkpoint_every_n_steps,
                                             auto_insert_metric_name=False))
    if logger is not None and logger is not False:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    options: dict[str, Any] = dict(max_epochs=cfg.epochs, precision=cfg.precision, accelerator=accelerator,
                                   devices=devices, num_nodes=num_nodes, strategy=strategy,
                                   logger=logger if logger is not None else False,  # False: no logger
                                   enable_checkpointing=checkpoint_dir is not None, enable_progress_bar=progress,
                                   # no layer table: with rich installed Lightning prints it to the console itself,
                                   # past the log levels that keep --quiet quiet
                                   enable_model_summary=False, callbacks=callbacks)
    if cfg.max_steps is not None:
        options["max_steps"] = cfg.max_steps
    options.update(trainer_kwargs)
    trainer = L.Trainer(**options)
    trainer.fit(module, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders, datamodule=datamodule,
                ckpt_path=ckpt_path)
    return module, trainer
