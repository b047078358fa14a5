"""The real models of the loss-aware study, trained here from scratch on CIFAR-10 (seeded; weights committed).

    python -m experiments.study_models --data PATH/TO/cifar10 [--output experiments/models] [--only NAME]

Seven models of different shapes and recipes (six ViTs and a Swin), beside the MNIST stand-ins (DeiT-S, ViT-L and
Swin-B shapes) that :mod:`lowrank_vit.repro.standins` trains. The same recipe and seed on another CPU train other
weights (floating-point rounding differs, and thousands of steps amplify it), so the study uses the committed ones:

* ``cifar_deit4``: the comparison table's model (:mod:`experiments.cifar10`'s recipe unchanged): 4 blocks, width
  128, 2 heads, 4x4 patches (64 tokens), average pooling, label smoothing, shifts and flips, 6 epochs.
* ``cifar_vit6``: 6 blocks, width 96, 3 heads, 8x8 patches (16 tokens + a class token), the class token's head,
  no label smoothing, a lower learning rate, flips only, 8 epochs.
* ``cifar_vit6_long``: ``cifar_vit6``'s shape trained nearly four times longer (30 epochs, shifts and flips, label
  smoothing): a model that uses more of its capacity, so compression costs it more (as it does real, fully trained
  models).
* ``cifar_vit4_wide_long``: another fully trained shape: 4 blocks, width 128, 4 heads of 32, a narrow MLP (ratio 2),
  8x8 patches and average pooling without a class token, 25 epochs with shifts, flips and label smoothing.
* ``cifar_swin_long``: a hierarchical model trained to convergence (timm's Swin class): 4x4 patches (64 tokens),
  windows of 4x4 tokens, two stages of two blocks (width 64 with 2 heads, then a patch merging to 16 tokens of width
  128 with 4 heads), 25 epochs with shifts, flips and label smoothing.
* ``cifar_deit3_ls``: the DeiT-III layout (timm's ``deit3`` models): LayerScale on every residual branch (initialized
  at 0.1, learned per channel), a class token outside the position embedding, and no bias in qkv; deeper and
  narrower than the others (8 blocks, width 64, 2 heads, 8x8 patches), 25 epochs with shifts, flips and label
  smoothing.
* ``cifar_vit3_wide``: shallow and wide (3 blocks, width 160, 5 heads of 32, 8x8 patches, average pooling), trained
  without label smoothing and with twice the weight decay (0.1), 20 epochs with shifts and flips.

The last two were added after the study had chosen the library's default, to check that choice on models it was
not made on (docs/loss_aware.md, "Two models added after the default was chosen").

Each lands in ``OUTPUT/NAME/model.safetensors`` beside ``model.json`` (recipe, data, fingerprint, top-1, seconds); a
model whose recipe and images are unchanged is not trained again, wherever ``--data`` puts the images (the record
names them by content: :func:`experiments.cifar10.data_identity`). The weights are small (about 3 MB) and committed,
so the study runs without retraining.
"""

from __future__ import annotations

from .cifar10 import Recipe, train_models

MODELS: dict[str, Recipe] = {
    "cifar_deit4": Recipe(),
    "cifar_vit6": Recipe(
        model_kwargs={"img_size": 32, "in_chans": 3, "num_classes": 10, "patch_size": 8, "embed_dim": 96,
                      "depth": 6, "num_heads": 3, "mlp_ratio": 4.0, "global_pool": "token", "class_token": True},
        epochs=8, lr=1e-3, batch_size=128, weight_decay=0.05, warmup_fraction=0.1, label_smoothing=0.0,
        max_shift=0, seed=1),
    "cifar_vit6_long": Recipe(
        model_kwargs={"img_size": 32, "in_chans": 3, "num_classes": 10, "patch_size": 8, "embed_dim": 96,
                      "depth": 6, "num_heads": 3, "mlp_ratio": 4.0, "global_pool": "token", "class_token": True},
        epochs=30, lr=1e-3, batch_size=128, weight_decay=0.05, warmup_fraction=0.05, label_smoothing=0.1,
        max_shift=4, seed=2),
    "cifar_vit4_wide_long": Recipe(
        model_kwargs={"img_size": 32, "in_chans": 3, "num_classes": 10, "patch_size": 8, "embed_dim": 128,
                      "depth": 4, "num_heads": 4, "mlp_ratio": 2.0, "global_pool": "avg", "class_token": False},
        epochs=25, lr=1.5e-3, batch_size=128, weight_decay=0.05, warmup_fraction=0.05, label_smoothing=0.1,
        max_shift=4, seed=3),
    "cifar_swin_long": Recipe(
        model_kwargs={"img_size": 32, "in_chans": 3, "num_classes": 10, "patch_size": 4, "window_size": 4,
                      "embed_dim": 64, "depths": [2, 2], "num_heads": [2, 4], "mlp_ratio": 4.0},
        epochs=25, lr=1e-3, batch_size=128, weight_decay=0.05, warmup_fraction=0.05, label_smoothing=0.1,
        max_shift=4, seed=4, timm_name="swin_tiny_patch4_window7_224"),
    "cifar_deit3_ls": Recipe(
        model_kwargs={"img_size": 32, "in_chans": 3, "num_classes": 10, "patch_size": 8, "embed_dim": 64,
                      "depth": 8, "num_heads": 2, "mlp_ratio": 4.0, "init_values": 0.1, "qkv_bias": False},
        epochs=25, lr=1.5e-3, batch_size=128, weight_decay=0.05, warmup_fraction=0.05, label_smoothing=0.1,
        max_shift=4, seed=5, timm_name="deit3_small_patch16_224"),
    "cifar_vit3_wide": Recipe(
        model_kwargs={"img_size": 32, "in_chans": 3, "num_classes": 10, "patch_size": 8, "embed_dim": 160,
                      "depth": 3, "num_heads": 5, "mlp_ratio": 4.0, "global_pool": "avg", "class_token": False},
        epochs=20, lr=2e-3, batch_size=128, weight_decay=0.1, warmup_fraction=0.05, label_smoothing=0.0,
        max_shift=4, seed=6, timm_name="vit_base_patch16_224"),
}


def main(argv: list[str] | None = None) -> int:
    return train_models(MODELS, "python -m experiments.study_models", __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
