"""ViT weights trained in other libraries, read into timm's ``VisionTransformer``: torchvision's
``VisionTransformer``, Hugging Face transformers' ViT, DeiT, CLIP vision tower, DINOv2 (with and without registers)
and SigLIP vision tower.

A state dict's layout is told by its keys (:func:`detect_layout`); each layout is one table of renames in
:data:`LAYOUTS` (a regular expression on the key, the timm key, and where needed a reshape). Separate query, key and
value projections are renamed to ``attn.q``/``attn.k``/``attn.v`` and then concatenated into timm's ``attn.qkv`` in
that order (torchvision's ``in_proj_weight`` already is). The timm constructor arguments the shapes fix (patch size,
width, depth, MLP ratio, image size, classes, prefix tokens, input channels, LayerScale, pooling) are read off the
converted tensors (:func:`infer_kwargs`); the number of heads is not in the shapes: it comes from a transformers
``config.json`` beside the checkpoint, else from the user, else the conversion is refused (:func:`merge_kwargs`).

DINOv2 (``Dinov2Model``, ``Dinov2WithRegistersModel`` and their ``...ForImageClassification`` backbones):
``layer_scale{1,2}.lambda1`` are timm's ``ls{1,2}.gamma`` (``init_values`` set, any value: the gammas replace it),
the mask token (masked-image pretraining only) is dropped. Register tokens are timm's ``reg_token``; DINOv2 adds its
position embeddings to the class and patch tokens and only then inserts the registers, which is timm's
``no_embed_class`` once the class token's position embedding is added into the class token (exact: the same sum).
The classifier of ``Dinov2ForImageClassification`` reads the class token and the patch tokens' mean together, which
timm's head cannot: it is dropped with a note (features, ``num_classes`` 0). The SwiGLU MLP (``use_swiglu_ffn``,
DINOv2 giant: ``mlp.weights_in``/``weights_out``, or ``gate_proj``/``up_proj``/``down_proj`` in transformers 5's
modules) is timm's packed ``fc1`` (gate half first) and ``fc2``, ``act_layer`` ``silu``; timm builds it only in a name
whose MLP is ``SwiGLUPacked`` (``vit_giant_patch14_dinov2``): an MLP class is no constructor argument a plan records.

SigLIP (``SiglipVisionModel``, the vision tower of ``SiglipModel``, ``SiglipForImageClassification``): no class
token, the position embedding an ``nn.Embedding`` weight, ``post_layernorm`` timm's ``norm``, and the
attention-pooling head timm's ``global_pool='map'`` (``AttentionPoolLatent``: ``head.probe`` its ``latent``, the
first third of ``in_proj`` its ``q``, the other two its ``kv``, ``out_proj`` its ``proj``, ``layernorm`` its ``norm``,
``mlp`` its ``mlp``); ``gelu_pytorch_tanh`` is timm's ``gelu_tanh`` (assumed without a config). The classifier of
``SiglipForImageClassification`` reads the tokens' mean: ``global_pool='avg'`` with ``fc_norm=False`` (the final
LayerNorm before the mean, as there), the unused attention-pooling head dropped with a note.

LayerNorm's epsilon is not passed on: timm's ViT takes it only as a ``norm_layer`` callable, which cannot be recorded
in a model directory's plan (JSON). transformers' ViT and DeiT use 1e-12, CLIP 1e-5, torchvision 1e-6, timm's ViT
names 1e-6 (its CLIP names 1e-5); the logits differ by float32 rounding only (see docs/cli.md). DINOv2 and
SigLIP use 1e-6, as timm's ViT names do: their outputs match to float32 rounding.

Position embeddings are converted for the checkpoint's own grid (a ``config.json``'s ``image_size``: 518 for
DINOv2's released models); at another input size transformers' DINOv2 resamples them on each call and timm does so
only with ``dynamic_img_size=True``, with a different resampling where transformers' ``Dinov2Model`` uses bicubic
without antialiasing (timm's ``resample_abs_pos_embed`` antialiases): docs/cli.md gives the difference measured.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowrank_vit.io.checkpoints import CheckpointError, read_state_dict

Rename = tuple[str, str, Callable[[torch.Tensor], torch.Tensor] | None]
"""A regular expression matched against the whole key, the timm key (``\\1``... from its groups), a reshape."""


class ConversionError(ValueError):
    """A foreign state dict that cannot be read into timm's layout, or constructor arguments that do not fit it."""


def _token(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, 1, -1)  # CLIP's class embedding is a vector


def _batched(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == 2 else t  # CLIP's position embedding is an nn.Embedding weight


_TV_BLOCK = r"encoder\.layers\.encoder_layer_(\d+)\."
_BLOCK = r"(?:encoder\.layer|layers)\.(\d+)\."  # transformers' files (encoder.layer.N), its v5 modules (layers.N)
_HF_EMBEDDINGS: tuple[Rename, ...] = (
    (r"embeddings\.cls_token", "cls_token", None),
    (r"embeddings\.position_embeddings", "pos_embed", None),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1", None),
)
_HF_ATTENTION: tuple[Rename, ...] = (  # transformers' files (attention.attention.query), its v5 modules (q_proj)
    (_BLOCK + r"attention\.(?:attention\.query|q_proj)\.(weight|bias)", r"blocks.\1.attn.q.\2", None),
    (_BLOCK + r"attention\.(?:attention\.key|k_proj)\.(weight|bias)", r"blocks.\1.attn.k.\2", None),
    (_BLOCK + r"attention\.(?:attention\.value|v_proj)\.(weight|bias)", r"blocks.\1.attn.v.\2", None),
    (_BLOCK + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"blocks.\1.attn.proj.\2", None),
)
_HF_VIT: tuple[Rename, ...] = (
    *_HF_EMBEDDINGS,
    *_HF_ATTENTION,
    (_BLOCK + r"layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2", None),
    (_BLOCK + r"layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2", None),
    (_BLOCK + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2", None),
    (_BLOCK + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2", None),
    (r"layernorm\.(weight|bias)", r"norm.\1", None),
    (r"classifier\.(weight|bias)", r"head.\1", None),
)
_DINOV2: tuple[Rename, ...] = (
    *_HF_EMBEDDINGS,
    (r"embeddings\.register_tokens", "reg_token", None),
    *_HF_ATTENTION,
    (_BLOCK + r"norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3", None),
    (_BLOCK + r"layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma", None),
    (_BLOCK + r"mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3", None),
    (_BLOCK + r"mlp\.weights_in\.(weight|bias)", r"blocks.\1.mlp.fc1.\2", None),  # SwiGLU, (gate, value) packed
    (_BLOCK + r"mlp\.weights_out\.(weight|bias)", r"blocks.\1.mlp.fc2.\2", None),
    (_BLOCK + r"mlp\.gate_proj\.(weight|bias)", r"blocks.\1.mlp.fc1_gate.\2", None),  # v5 modules: the halves,
    (_BLOCK + r"mlp\.up_proj\.(weight|bias)", r"blocks.\1.mlp.fc1_up.\2", None),  # packed by merge_gated_mlp
    (_BLOCK + r"mlp\.down_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2", None),
    (r"layernorm\.(weight|bias)", r"norm.\1", None),
)
_DINOV2_CLASSIFIER = ("classifier.weight", "its classifier reads the class token and the patch tokens' mean "
                      "together, which timm's head cannot: dropped, the model gives features (num_classes 0)")
_CLIP_ENCODER: tuple[Rename, ...] = (  # CLIP's and SigLIP's encoder layers
    (r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"blocks.\1.attn.\2.\3", None),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2", None),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"blocks.\1.norm1.\2", None),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"blocks.\1.norm2.\2", None),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3", None),
    (r"post_layernorm\.(weight|bias)", r"norm.\1", None),
)


@dataclass(frozen=True)
class Layout:
    """How to recognize one library's ViT state dict and rename it to timm's."""

    requires: tuple[str, ...]
    """Keys (after :attr:`prefix` is removed) whose presence marks the layout."""
    renames: tuple[Rename, ...]
    prefix: str = ""
    """The prefix a task model puts before the backbone's keys (``vit.``): removed where present."""
    excludes: tuple[str, ...] = ()
    """Keys whose presence rules the layout out (a DeiT is not a ViT)."""
    drops: tuple[str, ...] = ()
    """Regular expressions of keys with no place in timm's model, dropped with a note (a pooler, a text tower)."""
    norm_eps: float = 1e-6
    """The source library's default LayerNorm epsilon (a transformers config.json says its own)."""
    explains: tuple[tuple[str, str], ...] = ()
    """(key, note): the note added when the key (after :attr:`prefix` is removed) is in the state dict."""
    kwargs: tuple[tuple[str, Any], ...] = ()
    """Constructor arguments every model of the family has and no tensor shows (SigLIP's tanh GELU), under a
    config's."""
    registers_after_positions: bool = False
    """The register tokens join after the position embeddings are added to the class and patch tokens (DINOv2):
    with registers, timm's ``no_embed_class``, the class token's position embedding added into it; ``reg_tokens``
    and ``no_embed_class`` are always said (0 and False without registers, whatever the timm name's)."""


LAYOUTS: dict[str, Layout] = {
    "torchvision-vit": Layout(
        requires=("conv_proj.weight", "encoder.pos_embedding"),
        renames=(
            (r"class_token", "cls_token", None),
            (r"conv_proj\.(weight|bias)", r"patch_embed.proj.\1", None),
            (r"encoder\.pos_embedding", "pos_embed", None),
            (_TV_BLOCK + r"ln_1\.(weight|bias)", r"blocks.\1.norm1.\2", None),
            (_TV_BLOCK + r"self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2", None),
            (_TV_BLOCK + r"self_attention\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2", None),
            (_TV_BLOCK + r"ln_2\.(weight|bias)", r"blocks.\1.norm2.\2", None),
            (_TV_BLOCK + r"mlp\.(?:0|linear_1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2", None),
            (_TV_BLOCK + r"mlp\.(?:3|linear_2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2", None),
            (r"encoder\.ln\.(weight|bias)", r"norm.\1", None),
            (r"heads\.head\.(weight|bias)", r"head.\1", None),
        ),
    ),
    "hf-vit": Layout(
        requires=("embeddings.patch_embeddings.projection.weight",), prefix="vit.", renames=_HF_VIT,
        drops=(r"pooler\..*", r"embeddings\.mask_token"), norm_eps=1e-12,
        excludes=("embeddings.distillation_token", "encoder.layer.0.layer_scale1.lambda1"),  # DeiT's, DINOv2's
    ),
    "hf-deit": Layout(
        requires=("embeddings.patch_embeddings.projection.weight", "embeddings.distillation_token"), prefix="deit.",
        renames=(
            *_HF_VIT,
            (r"embeddings\.distillation_token", "dist_token", None),
            (r"cls_classifier\.(weight|bias)", r"head.\1", None),
            (r"distillation_classifier\.(weight|bias)", r"head_dist.\1", None),
        ),
        drops=(r"pooler\..*", r"embeddings\.mask_token"), norm_eps=1e-12,
    ),
    "hf-clip-vision": Layout(
        requires=("embeddings.class_embedding", "embeddings.patch_embedding.weight"), prefix="vision_model.",
        renames=(
            (r"embeddings\.class_embedding", "cls_token", _token),
            (r"embeddings\.patch_embedding\.weight", "patch_embed.proj.weight", None),
            (r"embeddings\.position_embedding\.weight", "pos_embed", _batched),
            (r"pre_layrnorm\.(weight|bias)", r"norm_pre.\1", None),
            *_CLIP_ENCODER,
        ),
        drops=(r"embeddings\.position_ids", r"text_model\..*", r"visual_projection\..*", r"text_projection\..*",
               r"logit_scale"),
        norm_eps=1e-5,
    ),
    "hf-dinov2": Layout(
        requires=("embeddings.patch_embeddings.projection.weight", "encoder.layer.0.layer_scale1.lambda1"),
        prefix="dinov2.", excludes=("embeddings.register_tokens",), renames=_DINOV2, registers_after_positions=True,
        drops=(r"embeddings\.mask_token", r"classifier\..*"), explains=(_DINOV2_CLASSIFIER,),
    ),
    "hf-dinov2-registers": Layout(
        requires=("embeddings.patch_embeddings.projection.weight", "encoder.layer.0.layer_scale1.lambda1",
                  "embeddings.register_tokens"),
        prefix="dinov2_with_registers.", renames=_DINOV2, registers_after_positions=True,
        drops=(r"embeddings\.mask_token", r"classifier\..*"), explains=(_DINOV2_CLASSIFIER,),
    ),
    "hf-siglip-vision": Layout(
        requires=("embeddings.patch_embedding.weight", "embeddings.position_embedding.weight"),
        prefix="vision_model.", excludes=("embeddings.class_embedding",),  # CLIP's
        renames=(
            (r"embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.proj.\1", None),
            (r"embeddings\.position_embedding\.weight", "pos_embed", _batched),
            *_CLIP_ENCODER,
            (r"head\.probe", "attn_pool.latent", None),
            (r"head\.attention\.in_proj_(weight|bias)", r"attn_pool.in_proj.\1", None),  # split by latent_pool
            (r"head\.attention\.out_proj\.(weight|bias)", r"attn_pool.proj.\1", None),
            (r"head\.layernorm\.(weight|bias)", r"attn_pool.norm.\1", None),
            (r"head\.mlp\.(fc1|fc2)\.(weight|bias)", r"attn_pool.mlp.\1.\2", None),
            (r"classifier\.(weight|bias)", r"head.\1", None),  # SiglipForImageClassification: on the mean
        ),
        drops=(r"embeddings\.position_ids", r"text_model\..*", r"logit_scale", r"logit_bias"),
        kwargs=(("act_layer", "gelu_tanh"),),
    ),
}
"""The layouts converted, by name (``timm`` is the layout of anything else, left as it is)."""

SHAPE_KWARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "mlp_ratio", "num_classes", "class_token",
                "reg_tokens", "qkv_bias", "pre_norm", "init_values", "no_embed_class", "global_pool", "fc_norm")
"""Constructor arguments the tensors fix: a user's value that differs is an error."""
_ACTIVATIONS = {"gelu": None, "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu", "silu": "silu"}
"""transformers' hidden_act to timm's act_layer (None: timm's default, exact GELU)."""


@dataclass
class ConvertedCheckpoint:
    """A state dict in timm's layout and what it says about the model to build."""

    layout: str
    state_dict: dict[str, torch.Tensor]
    inferred_kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments for ``timm.create_model``: those of :data:`SHAPE_KWARGS` the tensors fix, and those a
    transformers config says (``num_heads``, ``img_size`` of a non-square grid, ``act_layer``), and those the
    layout fixes (DINOv2's ``no_embed_class``, SigLIP's ``act_layer``)."""
    notes: list[str] = field(default_factory=list)
    required: dict[str, str] = field(default_factory=dict)
    """Arguments neither the tensors nor a config fix, with an example value for the message."""


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if prefix and key.startswith(prefix) else key


def detect_layout(tensors: dict[str, Any]) -> str:
    """The name in :data:`LAYOUTS` whose keys the state dict has, else ``"timm"``."""
    for name, layout in LAYOUTS.items():
        keys = {_strip(k, layout.prefix) for k in tensors}
        if all(k in keys for k in layout.requires) and not any(k in keys for k in layout.excludes):
            return name
    return "timm"


def rename(tensors: dict[str, torch.Tensor], layout: Layout) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every key through the layout's table (first match); dropped keys noted; unknown keys kept as they are, for
    the strict load to name."""
    table = [(re.compile(pattern), target, reshape) for pattern, target, reshape in layout.renames]
    drops = [re.compile(pattern) for pattern in layout.drops]
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in tensors.items():
        short = _strip(key, layout.prefix)
        if any(d.fullmatch(short) for d in drops):
            dropped.append(key)
            continue
        for pattern, target, reshape in table:
            match = pattern.fullmatch(short)
            if match:
                out[match.expand(target)] = reshape(value) if reshape else value
                break
        else:
            out[key] = value
    notes = [f"dropped {len(dropped)} tensors timm's ViT has no place for ({', '.join(sorted(dropped)[:3])}"
             f"{' ...' if len(dropped) > 3 else ''})"] if dropped else []
    return out, notes


def merge_qkv(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``blocks.N.attn.q/k/v.{weight,bias}`` concatenated (q, k, v) into ``blocks.N.attn.qkv.{weight,bias}``."""
    out = dict(tensors)
    for key in [k for k in tensors if re.fullmatch(r"blocks\.\d+\.attn\.q\.(weight|bias)", k)]:
        stem, kind = key.rsplit(".", 2)[0], key.rsplit(".", 1)[1]
        parts = [f"{stem}.{p}.{kind}" for p in "qkv"]
        if not all(p in tensors for p in parts):
            raise ConversionError(f"{stem} has a query {kind} but not all of its key and value {kind}s")
        out[f"{stem}.qkv.{kind}"] = torch.cat([out.pop(p) for p in parts], dim=0)
    return out


def merge_gated_mlp(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``blocks.N.mlp.fc1_gate/fc1_up.{weight,bias}`` (a SwiGLU's halves, transformers 5's DINOv2 modules)
    concatenated, gate first, into timm's packed ``blocks.N.mlp.fc1`` (``SwiGLUPacked``: ``silu(gate) * up``)."""
    out = dict(tensors)
    for key in [k for k in tensors if re.fullmatch(r"blocks\.\d+\.mlp\.fc1_gate\.(weight|bias)", k)]:
        stem, kind = key.rsplit(".", 2)[0], key.rsplit(".", 1)[1]
        if f"{stem}.fc1_up.{kind}" not in tensors:
            raise ConversionError(f"{stem} has a SwiGLU gate {kind} but not its up-projection {kind}")
        out[f"{stem}.fc1.{kind}"] = torch.cat([out.pop(f"{stem}.fc1_gate.{kind}"), out.pop(f"{stem}.fc1_up.{kind}")])
    return out


def latent_pool(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """SigLIP's attention-pooling head as timm's ``AttentionPoolLatent``: its ``in_proj`` (query, key, value rows)
    split into ``attn_pool.q`` (the first third) and ``attn_pool.kv``. With a classifier (``head``, which
    SiglipForImageClassification puts on the tokens' mean) the head is unused: dropped, with a note."""
    pool = [k for k in tensors if k.startswith("attn_pool.")]
    if not pool:
        return tensors, []
    if "head.weight" in tensors:
        return ({k: v for k, v in tensors.items() if not k.startswith("attn_pool.")},
                [f"the classifier reads the tokens' mean: the attention-pooling head it does not use dropped "
                 f"({len(pool)} tensors)"])
    out = dict(tensors)
    for kind in ("weight", "bias"):
        joined = out.pop(f"attn_pool.in_proj.{kind}", None)
        if joined is None:
            continue
        if joined.shape[0] % 3:
            raise ConversionError(f"the attention-pooling head's in_proj {kind} has {joined.shape[0]} rows, not "
                                  f"three equal parts (query, key, value)")
        third = joined.shape[0] // 3
        out[f"attn_pool.q.{kind}"], out[f"attn_pool.kv.{kind}"] = joined[:third], joined[third:]
    return out, []


def registers_after_positions(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                                          list[str]]:
    """DINOv2's token order in timm's terms. DINOv2 adds its position embeddings (class token and patches) and
    then inserts the register tokens, which take none: timm's ``no_embed_class``, where the position embeddings
    are the patches' alone and the class token's own is added into the class token (the same sum, exactly).
    Without registers (none, or an empty ``register_tokens``) nothing moves: ``no_embed_class`` False."""
    out = dict(tensors)
    registers = out.get("reg_token")
    if registers is not None and registers.shape[1] == 0:
        del out["reg_token"]
        registers = None
    if registers is None or "pos_embed" not in out or "cls_token" not in out:
        return out, {"reg_tokens": 0, "no_embed_class": False}, []
    position = out["pos_embed"]
    out["cls_token"] = out["cls_token"] + position[:, :1]
    out["pos_embed"] = position[:, 1:]
    return out, {"reg_tokens": int(registers.shape[1]), "no_embed_class": True}, [
        "register tokens: no_embed_class, the class token's position embedding added into it"]


def distillation_token(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A DeiT with both heads is timm's distilled model (``dist_token``, ``head_dist``: eval logits the mean of the
    two, as DeiTForImageClassificationWithTeacher's). One classifier or none reads the class token only: the
    distillation token then is a register token of a plain ViT (``reg_token``, ``reg_tokens=1``), exactly."""
    if "dist_token" not in tensors or "head_dist.weight" in tensors:
        return tensors, (["two heads: load it into a deit_*_distilled_* name"] if "dist_token" in tensors else [])
    out = {("reg_token" if k == "dist_token" else k): v for k, v in tensors.items()}
    return out, ["one classifier on the class token: a plain ViT name, the distillation token a register token"]


def _config_kwargs(config: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """What a transformers config says that the tensors do not (``vision_config`` of a full CLIP config)."""
    if not isinstance(config, dict):
        return {}, []
    config = config.get("vision_config", config) if isinstance(config.get("vision_config"), dict) else config
    if "num_attention_heads" not in config:
        return {}, []  # not a transformers config (timm's hub config.json has none)
    kwargs: dict[str, Any] = {"num_heads": int(config["num_attention_heads"])}
    size = config.get("image_size")
    if isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 2):
        kwargs["img_size"] = size if isinstance(size, int) else [int(size[0]), int(size[1])]
    if isinstance(config.get("num_channels"), int):
        kwargs["in_chans"] = config["num_channels"]
    act = config.get("hidden_act")
    if isinstance(act, str) and _ACTIVATIONS.get(act, act) is not None:
        kwargs["act_layer"] = _ACTIVATIONS.get(act, act)
    notes = []
    eps = config.get("layer_norm_eps")
    if isinstance(eps, (int, float)) and eps != 1e-6:
        notes.append(f"LayerNorm eps {eps:g} in the source, timm's name's own here (1e-6 for ViT names)")
    return kwargs, notes


def _as_pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


def infer_kwargs(tensors: dict[str, torch.Tensor], img_size: Any = None,
                 no_embed_class: bool = False) -> dict[str, Any]:
    """The constructor arguments of :data:`SHAPE_KWARGS` that a timm-layout ViT state dict fixes. ``img_size`` (from
    a config) is checked against the position embeddings and kept; else a square grid is assumed. With
    ``no_embed_class`` the position embeddings are the patches' alone (no prefix tokens').

    LayerScale gammas set ``init_values`` (1.0: the checkpoint's gammas replace it); an attention-pooling head
    (``attn_pool.latent``) ``global_pool="map"``; no class token and no such head the tokens' mean after the final
    LayerNorm (``global_pool="avg"``, ``fc_norm=False``), timm's token pooling needing a class token. A gated MLP
    (``fc1`` twice ``fc2``'s input) gets the MLP ratio of ``fc1``, as timm's ``SwiGLUPacked`` counts it."""
    proj = tensors.get("patch_embed.proj.weight")
    if proj is None or proj.dim() != 4:
        raise ConversionError("no patch embedding (patch_embed.proj.weight, 4-D) after conversion")
    dim, chans, ph, pw = (int(s) for s in proj.shape)
    kwargs: dict[str, Any] = {"patch_size": ph if ph == pw else [ph, pw], "in_chans": chans, "embed_dim": dim}
    depth = 1 + max((int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    kwargs["depth"] = depth
    fc1 = tensors.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        hidden = int(fc1.shape[0])
        ratio = hidden / dim
        while int(dim * ratio) < hidden:  # timm builds int(embed_dim * mlp_ratio) units
            ratio = math.nextafter(ratio, math.inf)
        kwargs["mlp_ratio"] = ratio
    kwargs["qkv_bias"] = "blocks.0.attn.qkv.bias" in tensors or depth == 0
    if "blocks.0.ls1.gamma" in tensors:
        kwargs["init_values"] = 1.0
    kwargs["class_token"] = "cls_token" in tensors
    if "attn_pool.latent" in tensors:
        kwargs["global_pool"] = "map"
    elif not kwargs["class_token"]:
        kwargs["global_pool"], kwargs["fc_norm"] = "avg", False
    if "reg_token" in tensors:
        kwargs["reg_tokens"] = int(tensors["reg_token"].shape[1])
    if "norm_pre.weight" in tensors:
        kwargs["pre_norm"] = True
    kwargs["num_classes"] = int(tensors["head.weight"].shape[0]) if "head.weight" in tensors else 0
    pos = tensors.get("pos_embed")
    if pos is not None:
        prefix = 0 if no_embed_class else (int(kwargs["class_token"]) + kwargs.get("reg_tokens", 0)
                                           + int("dist_token" in tensors))
        grid = int(pos.shape[-2]) - prefix
        given = _as_pair(img_size)
        if given is not None:
            if (given[0] // ph) * (given[1] // pw) != grid:
                raise ConversionError(f"config.json's image_size {img_size} and patch size {ph} make "
                                      f"{(given[0] // ph) * (given[1] // pw)} patches, the position embeddings "
                                      f"{grid}")
            kwargs["img_size"] = img_size
        elif math.isqrt(grid) ** 2 == grid and ph == pw:
            kwargs["img_size"] = math.isqrt(grid) * ph
    return kwargs


def to_timm(tensors: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> ConvertedCheckpoint:
    """The state dict in timm's ViT layout, with the constructor arguments it and ``config`` (a transformers
    ``config.json``, if any) fix. A timm-layout (or unknown) state dict comes back as it is, with nothing inferred.

    Raises:
        ConversionError: a foreign layout whose tensors do not make a ViT (a query without its key and value, no
            patch embedding, a config whose image size does not fit the position embeddings).
    """
    name = detect_layout(tensors)
    if name == "timm":
        return ConvertedCheckpoint("timm", tensors)
    layout = LAYOUTS[name]
    out, notes = rename(tensors, layout)
    keys = {_strip(k, layout.prefix) for k in tensors}
    notes += [note for key, note in layout.explains if key in keys]
    out = merge_gated_mlp(merge_qkv(out))
    out, more = latent_pool(out)
    notes += more
    out, more = distillation_token(out)
    notes += more
    fixed: dict[str, Any] = {}
    if layout.registers_after_positions:
        out, fixed, more = registers_after_positions(out)
        notes += more
    from_config, config_notes = _config_kwargs(config)
    kwargs = infer_kwargs(out, from_config.get("img_size"), no_embed_class=fixed.get("no_embed_class", False))
    kwargs.update(fixed)
    fc1, fc2 = out.get("blocks.0.mlp.fc1.weight"), out.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:
        kwargs["act_layer"] = "silu"  # DINOv2's SwiGLU, whatever hidden_act says
        notes.append("SwiGLU MLP: build it as a name whose MLP is timm's SwiGLUPacked (vit_giant_patch14_dinov2)")
    for key, value in (*from_config.items(), *layout.kwargs):  # the config's, where the shapes said nothing
        if key == "in_chans" and value != kwargs["in_chans"]:
            raise ConversionError(f"config.json's num_channels {value} and the patch embedding's "
                                  f"{kwargs['in_chans']} input channels differ")
        kwargs.setdefault(key, value)
    if config_notes:
        notes += config_notes
    elif layout.norm_eps != 1e-6:
        notes.append(f"LayerNorm eps {layout.norm_eps:g} in the source, timm's name's own here")
    required = {}
    if "num_heads" not in kwargs:
        required["num_heads"] = "N"
    if name == "hf-clip-vision" and "act_layer" not in kwargs:
        required["act_layer"] = '"quick_gelu"'  # OpenAI's CLIP; LAION's use "gelu"
    return ConvertedCheckpoint(name, out, kwargs, notes, required)


def read_transformers_config(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The transformers ``config.json`` beside a checkpoint (one with ``num_attention_heads``), else None."""
    path = Path(checkpoint).expanduser().parent / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    inner = data.get("vision_config") if isinstance(data.get("vision_config"), dict) else data
    return data if "num_attention_heads" in inner else None


def _same(key: str, user: Any, inferred: Any, kwargs: dict[str, Any]) -> bool:
    if key in ("img_size", "patch_size"):
        return _as_pair(user) == _as_pair(inferred)
    if key == "init_values":  # any value builds the LayerScale the gammas load into; None or 0 none
        return bool(user) == bool(inferred)
    if key == "mlp_ratio":
        dim = kwargs.get("embed_dim", 0)
        return isinstance(user, (int, float)) and int(dim * user) == int(dim * inferred)
    return bool(user == inferred)


def merge_kwargs(converted: ConvertedCheckpoint, user: dict[str, Any]) -> dict[str, Any]:
    """The user's constructor arguments over the inferred ones.

    Raises:
        ConversionError: a user value that contradicts one the tensors fix (:data:`SHAPE_KWARGS`), or an argument
            nobody gave (``num_heads``) that the weights cannot tell.
    """
    inferred = converted.inferred_kwargs
    for key in SHAPE_KWARGS:
        if key in user and key in inferred and not _same(key, user[key], inferred[key], inferred):
            raise ConversionError(f"--model-kwargs {key}={json.dumps(user[key])} contradicts the {converted.layout} "
                                  f"checkpoint, whose tensors fix {key}={json.dumps(inferred[key])}: drop it or make "
                                  f"them agree")
    merged = {**inferred, **user}
    missing = {k: v for k, v in converted.required.items() if k not in merged}
    if missing:
        example = "{" + ", ".join(f'"{k}": {v}' for k, v in missing.items()) + "}"
        raise ConversionError(f"the {converted.layout} checkpoint does not say its {' or '.join(missing)} (no "
                              f"transformers config.json beside it): give --model-kwargs '{example}'")
    return merged


def checkpoint_kwargs(path: str | os.PathLike, user: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The constructor arguments for a checkpoint file: the user's as they are for a timm-layout file (or one that
    cannot be read: loading it names the problem), else merged over what the conversion infers (:func:`merge_kwargs`),
    and the layout.

    Raises:
        ConversionError: as :func:`to_timm` and :func:`merge_kwargs`.
    """

    try:
        tensors, _ = read_state_dict(path)
    except (CheckpointError, OSError):
        return dict(user), "timm"
    if detect_layout(tensors) == "timm":
        return dict(user), "timm"
    converted = to_timm(tensors, read_transformers_config(path))
    return merge_kwargs(converted, user), converted.layout


__all__ = ["LAYOUTS", "SHAPE_KWARGS", "ConversionError", "ConvertedCheckpoint", "Layout", "checkpoint_kwargs",
           "detect_layout", "distillation_token", "infer_kwargs", "latent_pool", "merge_gated_mlp", "merge_kwargs",
           "merge_qkv", "read_transformers_config", "registers_after_positions", "rename", "to_timm"]
