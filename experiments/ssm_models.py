"""Vision state-space stand-ins trained here from scratch on CIFAR-10 (seeded; weights committed), for VMeanba and
the low-rank methods on state-space models (docs/vmeanba.md).

    python -m experiments.ssm_models --data PATH/TO/cifar10 [--output experiments/models] [--only NAME]

Two shapes of the VMamba-style model of ``lowrank_vit/nn/vssm.py`` (class ``vssm_micro``, shrunk by its arguments),
trained with the same loop as the study's ViTs (:func:`experiments.cifar10.train`):

* ``cifar_vssm4``: 4x4 patches (an 8x8 map, scans of 64 steps), width 64, two stages of two blocks (the second at
  4x4, width 128), one state per channel (VMamba's later setting), MLP ratio 4; shifts, flips and label smoothing.
* ``cifar_vssm2_deep``: 2x2 patches (a 16x16 map, scans of 256 steps), width 32, three stages of 1, 2 and 2 blocks,
  one state, MLP ratio 4; flips only and no label smoothing, a higher learning rate.

Each lands in ``OUTPUT/NAME/model.safetensors`` beside ``model.json`` (recipe, data fingerprint, top-1, seconds);
retraining on another CPU gives other weights, so the studies use the committed ones.
"""

from __future__ import annotations

from .cifar10 import Recipe, train_models

MODELS: dict[str, Recipe] = {
    "cifar_vssm4": Recipe(
        model_kwargs={"img_size": 32, "in_chans": 3, "num_classes": 10, "patch_size": 4, "embed_dim": 64,
                      "depths": [2, 2], "d_state": 1, "ssm_ratio": 1.0, "mlp_ratio": 4.0},
        epochs=8, lr=2e-3, batch_size=128, weight_decay=0.05, warmup_fraction=0.05, label_smoothing=0.1,
        max_shift=4, seed=7, timm_name="vssm_micro"),
    "cifar_vssm2_deep": Recipe(
        model_kwargs={"img_size": 32, "in_chans": 3, "num_classes": 10, "patch_size": 2, "embed_dim": 32,
                      "depths": [1, 2, 2], "d_state": 1, "ssm_ratio": 1.0, "mlp_ratio": 4.0},
        epochs=6, lr=3e-3, batch_size=128, weight_decay=0.05, warmup_fraction=0.05, label_smoothing=0.0,
        max_shift=0, seed=8, timm_name="vssm_micro"),
}


def main(argv: list[str] | None = None) -> int:
    return train_models(MODELS, "python -m experiments.ssm_models", __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
