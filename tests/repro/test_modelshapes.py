"""Tests of lowrank_vit/repro/modelshapes.py."""

from __future__ import annotations

import timm
import torch

from lowrank_vit.repro import estimate


def test_flops_of_a_tiny_vit_match_a_hand_count():
    """Linears 2 T k m each, attention's two products 2 T^2 d each, the patch embedding and the head: counted
    exactly (on the meta device, as the estimate builds its models)."""
    embed, depth, patch, size, classes = 32, 2, 8, 32, 10
    with torch.device("meta"):
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, patch_size=patch,
                                  embed_dim=embed, depth=depth, num_heads=2, num_classes=classes)
    shapes = estimate.count_shapes(model, (3, size, size))
    patches = (size // patch) ** 2
    tokens = patches + 1  # the class token
    linears = 2 * tokens * (embed * 3 * embed + embed * embed + 2 * embed * 4 * embed)
    attention = 2 * (2 * tokens * tokens * embed)  # Q K^T and A V, all heads together
    stem = 2 * patches * (3 * patch * patch) * embed
    head = 2 * embed * classes
    assert shapes.forward_flops == depth * (linears + attention) + stem + head
    assert shapes.compressible_flops == depth * linears
    assert {layer.tokens for layer in shapes.layers} == {tokens}
    assert len(shapes.layers) == 4 * depth
