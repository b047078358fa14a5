"""Where the compressible layers of a timm vision transformer are. Nothing else in the package knows module paths.

A *block* is any module with an ``mlp`` child and a token mixer: an ``attn`` child (timm's ViT, DeiT, distilled
DeiT, Swin, and most of their relatives) or an ``op`` child that runs a selective scan (the vision state-space
models of ``nn/vssm.py``). Inside a block the attention projections (``qkv``, or ``q``/``k``/``v``, and ``proj``),
the scan's projections (``in_proj``, ``x_proj.K``, ``dt_proj.K``, ``out_proj``) and the MLP layers (``fc1``,
``fc2``) are compressible when they are plain ``nn.Linear`` modules. Everything else
(patch embedding, norms, positional embedding, class/distillation tokens, Swin's patch merging, heads) is untouched.
The adapter also names the parts the partial fine-tune trains (classifier heads, patch embedding, tokens), the input
shape a model was built for, and how to build a shallower model of the same family (the rehearsal's ``--depth``).
Dispatch is on module structure and layer names, never on the model's name.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

from lowrank_vit.nn.comcat import FactorizedAttention
from lowrank_vit.nn.factorized import FactorizedLinear

ATTENTION_LINEARS = ("qkv", "q", "k", "v", "q_proj", "k_proj", "v_proj", "proj")
MLP_LINEARS = ("fc1", "fc1_g", "fc1_x", "fc2")  # fc1_g, fc1_x: the gate and value layers of timm's SwiGLU (EVA-02)
SCAN_LINEARS = ("in_proj", "x_proj", "dt_proj", "out_proj")  # x_proj, dt_proj: one nn.Linear per scan path
TOKEN_NAMES = ("cls_token", "dist_token", "reg_token", "pos_embed")


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def is_scan(module: nn.Module) -> bool:
    """A selective-scan token mixer: it can switch to VMeanba's channel-mean scan (``nn/vssm.SS2D``)."""
    return isinstance(getattr(module, "mean_scan", None), bool) and callable(getattr(module, "scan_inputs", None))


def _mixer(module: nn.Module) -> tuple[str, tuple[str, ...]] | None:
    """The token mixer's child name and its linear layers' names, or None when ``module`` is not a block."""
    children = dict(module.named_children())
    if "mlp" not in children:
        return None
    if "attn" in children:
        return "attn", ATTENTION_LINEARS
    if "op" in children and is_scan(children["op"]):
        return "op", SCAN_LINEARS
    return None


def is_block(module: nn.Module) -> bool:
    return _mixer(module) is not None


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild the dense model with timm: ``timm.create_model(architecture, pretrained=False, **kwargs)``."""

    architecture: str
    kwargs: dict[str, Any]


def _accepted(cls: type, kwargs: dict[str, Any], *, named_only: bool = False) -> dict[str, Any]:
    """The entries of ``kwargs`` that ``cls(...)`` takes: the options above are read for timm's VisionTransformer and
    SwinTransformer, and a relative with other names (EVA's ViTs with rotary embeddings, CaiT) refuses the ones it
    lacks; its architecture's own defaults then apply (whether they rebuild the model is checked when saving).
    ``named_only``: only those its signature names, not those it passes on through ``**kwargs`` (a distilled DeiT
    hands them to VisionTransformer, which takes none of EVA's)."""
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return {} if named_only else kwargs
    if not named_only and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return kwargs
    names = {p.name for p in parameters}
    return {key: value for key, value in kwargs.items() if key in names}


class TimmViTAdapter:
    """The one adapter for timm's ViT family (ViT, DeiT, distilled DeiT, Swin)."""

    def compressible_layers(self, model: nn.Module, include_factorized: bool = False) -> dict[str, nn.Module]:
        """Fully qualified name -> layer, in forward order, for every compressible linear of every block.

        Args:
            model: a timm vision transformer.
            include_factorized: also return layers already replaced by a factorized layer.
        """
        return {name: layer for block in self._layers_by_block(model, include_factorized).values()
                for name, layer in block.items()}

    def _layers_by_block(self, model: nn.Module, include_factorized: bool) -> dict[str, dict[str, nn.Module]]:
        wanted: tuple[type, ...] = (nn.Linear, FactorizedLinear) if include_factorized else (nn.Linear,)
        blocks: dict[str, dict[str, nn.Module]] = {}
        for block_name, block in model.named_modules():
            mixer = _mixer(block)
            if mixer is None:
                continue
            prefix = f"{block_name}." if block_name else ""
            layers: dict[str, nn.Module] = {}
            for part, names in (mixer, ("mlp", MLP_LINEARS)):
                parent = getattr(block, part)
                for name in names:
                    found = getattr(parent, name, None)
                    # a ModuleList (the scan's per-path projections) contributes each of its linears
                    members = found.named_children() if isinstance(found, nn.ModuleList) else [("", found)]
                    for index, layer in members:
                        if isinstance(layer, wanted):
                            layers[f"{prefix}{part}.{name}" + (f".{index}" if index else "")] = layer
            if layers:
                blocks[block_name] = layers
        return blocks

    def scan_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Fully qualified name -> selective-scan mixer (``op``) of every state-space block, in forward order."""
        return {f"{name}.op" if name else "op": block.op for name, block in model.named_modules()
                if (_mixer(block) or ("",))[0] == "op"}

    def attention_modules(self, model: nn.Module, include_factorized: bool = False) -> dict[str, nn.Module]:
        """Fully qualified name -> ``attn`` module of every block that computes q, k, v with one fused ``qkv``
        linear and its output with ``proj`` (what COMCAT replaces as a whole), in forward order.

        Args:
            model: a timm vision transformer.
            include_factorized: also return attention modules already replaced by a ``FactorizedAttention``.
        """

        modules: dict[str, nn.Module] = {}
        for block_name, block in model.named_modules():
            if (_mixer(block) or ("",))[0] != "attn":
                continue
            attn = block.attn
            fused = isinstance(getattr(attn, "qkv", None), nn.Linear) and isinstance(getattr(attn, "proj", None),
                                                                                     nn.Linear)
            if fused or (include_factorized and isinstance(attn, FactorizedAttention)):
                modules[f"{block_name}.attn" if block_name else "attn"] = attn
        return modules

    def layers_by_block(self, model: nn.Module) -> dict[str, dict[str, nn.Module]]:
        """Block name -> its compressible layers (as :meth:`compressible_layers`), blocks in forward order."""
        return self._layers_by_block(model, include_factorized=False)

    def classifier_names(self, model: nn.Module) -> list[str]:
        """Names of the classifier head(s): timm's ``pretrained_cfg["classifier"]`` (``head``, distilled DeiT's
        ``head_dist``, Swin's ``head.fc``), else the usual names that exist."""
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        names = cfg.get("classifier")
        names = [names] if isinstance(names, str) else list(names or [])
        names = [n for n in names if _has_submodule(model, n)]
        return names or [n for n in ("head", "head_dist", "fc", "classifier") if _has_submodule(model, n)]

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        """The patch embedding module (None if the model has none)."""
        patch_embed = getattr(model, "patch_embed", None)
        return patch_embed if isinstance(patch_embed, nn.Module) else None

    def token_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The positional embedding and the class, distillation and register tokens (top-level parameters)."""
        return {name: p for name, p in model.named_parameters() if "." not in name and name in TOKEN_NAMES}

    def is_distilled(self, model: nn.Module) -> bool:
        """Distilled DeiT: a second (distillation) head and timm's switch to train both."""
        return callable(getattr(model, "set_distilled_training", None)) and \
            isinstance(getattr(model, "head_dist", None), nn.Module)

    def input_shape(self, model: nn.Module) -> tuple[int | None, tuple[int, int] | None]:
        """The channels and (H, W) the model was built for, read from its modules (None where they do not say): a
        timm model's pretrained config keeps the registry's 3x224x224 even when built with ``img_size=28,
        in_chans=1``."""
        in_chans = None
        first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
        names = [first_conv] if isinstance(first_conv, str) else list(first_conv or [])
        for name in [*names, "patch_embed.proj", "stem.conv", "conv1"]:
            if _has_submodule(model, name) and isinstance(getattr(model.get_submodule(name), "in_channels", None),
                                                          int):
                in_chans = model.get_submodule(name).in_channels
                break
        size = getattr(self.patch_embedding(model), "img_size", None)
        if isinstance(size, int):
            size = (size, size)
        elif isinstance(size, (tuple, list)) and len(size) == 2:
            size = (int(size[0]), int(size[1]))
        else:
            size = None
        return in_chans, size

    def shrunk_kwargs(self, model: nn.Module, depth: int) -> dict[str, Any]:
        """timm constructor arguments that build the same family with at most ``depth`` blocks per stage."""
        layers = getattr(model, "layers", None)
        if layers is not None:  # Swin: stages of blocks
            return {"depths": tuple(min(len(stage.blocks), depth) for stage in layers)}
        return {"depth": min(len(model.blocks), depth)}

    def model_specs(self, model: nn.Module) -> list[ModelSpec]:
        """Every spec that may rebuild ``model``, most specific first: the arguments it records itself (then only
        those); else those read from its blocks (ViT's and Swin's layouts and their options, then the same with the
        MLP's width read from ``fc2``, as EVA defines it); then the architecture's own defaults with only the input
        size, channels, classes and pooling read (with and without the patch size). The last ones rebuild the
        families whose blocks the reading does not know (PVT-v2, TinyViT, DaViT, MaxViT, CrossViT, Twins, GCViT) as
        timm builds them by name. ``save_compressed`` keeps the first that rebuilds every tensor of the model and
        computes what it computes (``io/surgery.py``)."""
        architecture = self._architecture(model)
        if isinstance(getattr(model, "build_kwargs", None), dict):
            return [ModelSpec(architecture, dict(model.build_kwargs))]
        inputs = self._input_kwargs(model)
        try:
            specs = self._block_specs(model, architecture, inputs)
        except AttributeError:  # blocks without the norm1/num_heads/fc1 this reading expects
            specs = []
        for kwargs in (inputs, {key: value for key, value in inputs.items() if key != "patch_size"}):
            spec = ModelSpec(architecture, _accepted(type(model), kwargs))
            if spec not in specs:
                specs.append(spec)
        return specs

    def _architecture(self, model: nn.Module) -> str:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        architecture = cfg.get("architecture")
        if not architecture:
            raise ValueError(
                "cannot tell which timm architecture this model is (no pretrained_cfg['architecture']); "
                "pass model_name= and model_kwargs= to save_compressed, or own_model=True for a model of your own "
                "class (loaded back with load_compressed(path, model=the dense model))"
            )
        return architecture

    def _input_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """The arguments every family shares: the input size, patch size and channels, classes and pooling."""
        kwargs: dict[str, Any] = {}
        patch_embed = self.patch_embedding(model)
        if patch_embed is not None:
            if getattr(patch_embed, "img_size", None) is not None:
                size = patch_embed.img_size
                kwargs["img_size"] = [int(size), int(size)] if isinstance(size, int) else list(size)
            if getattr(patch_embed, "patch_size", None) is not None:
                size = patch_embed.patch_size
                kwargs["patch_size"] = int(size if isinstance(size, int) else size[0])
            in_chans, _ = self.input_shape(model)  # a hybrid's patch_embed.proj reads features, not images
            if in_chans is not None:
                kwargs["in_chans"] = in_chans
        if hasattr(model, "num_classes"):
            kwargs["num_classes"] = int(model.num_classes)
        if hasattr(model, "global_pool") and isinstance(model.global_pool, str):
            kwargs["global_pool"] = model.global_pool
        return kwargs

    def _block_specs(self, model: nn.Module, architecture: str, inputs: dict[str, Any]) -> list[ModelSpec]:
        """The specs read from the blocks: ViT's and Swin's layouts and their options, the MLP's width as fc1's
        (timm's ViT, also where a gated MLP halves it after fc1) and, if different, as fc2's input (EVA's, which
        doubles fc1 for a gated MLP); ``inputs``: :meth:`_input_kwargs`' reading, which they extend."""
        kwargs = dict(inputs)
        blocks = [m for m in model.modules() if is_block(m)]
        if not blocks:
            return [ModelSpec(architecture, kwargs)]
        first_qkv = getattr(blocks[0].attn, "qkv", None)
        if hasattr(model, "layers") and hasattr(model, "num_layers"):  # Swin: stages of blocks
            stages = list(model.layers)
            kwargs["embed_dim"] = int(stages[0].blocks[0].norm1.normalized_shape[0])
            kwargs["depths"] = [len(stage.blocks) for stage in stages]
            kwargs["num_heads"] = [int(stage.blocks[0].attn.num_heads) for stage in stages]
            windows = [[int(w) for w in stage.blocks[0].window_size] for stage in stages]
            if all(window == windows[0] for window in windows):  # one for all stages; else one per stage (Swin-S3)
                kwargs["window_size"] = windows[0][0] if windows[0][0] == windows[0][1] else windows[0]
            else:
                kwargs["window_size"] = windows
        else:
            dim = int(blocks[0].norm1.normalized_shape[0])
            kwargs["embed_dim"] = dim
            main = getattr(model, "blocks", None)  # CaiT's class-attention blocks live beside model.blocks
            kwargs["depth"] = len(main) if isinstance(main, (nn.Sequential, nn.ModuleList)) else len(blocks)
            kwargs["num_heads"] = int(blocks[0].attn.num_heads)
            if hasattr(model, "cls_token"):
                kwargs["class_token"] = model.cls_token is not None
            if hasattr(model, "num_reg_tokens"):
                kwargs["reg_tokens"] = int(model.num_reg_tokens)
            if hasattr(model, "no_embed_class"):
                kwargs["no_embed_class"] = bool(model.no_embed_class)
        mlp = blocks[0].mlp
        fc1 = mlp.fc1 if hasattr(mlp, "fc1") else mlp.fc1_g  # fc1_g: SwiGLU's gate, as wide as its value layer
        kwargs["mlp_ratio"] = fc1.out_features / fc1.in_features
        if first_qkv is not None:  # nn.Linear or FactorizedLinear: both keep the bias as ``bias``
            # BEiT, EVA and Swin V2 keep q and v biases beside a bias-free qkv; qkv_bias=True is what builds them
            kwargs["qkv_bias"] = first_qkv.bias is not None or getattr(blocks[0].attn, "q_bias", None) is not None
        # Options that add or remove parameters; their values are overwritten by the saved weights anyway.
        if (hasattr(blocks[0], "ls1") and hasattr(blocks[0].ls1, "gamma")) or \
                isinstance(getattr(blocks[0], "gamma_1", None), nn.Parameter):  # gamma_1: EVA's layer scale
            kwargs["init_values"] = 1e-5
        # EVA's and BEiT's MLP: gated (two layers, or one packed) or not, with a norm inside or not; said either way,
        # since the architectures' defaults differ, to the classes that name these options
        kwargs.update(_accepted(type(model), {
            "swiglu_mlp": hasattr(mlp, "fc1_g") or hasattr(mlp, "chunk_dim"),
            "scale_mlp": not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)}, named_only=True))
        if not isinstance(getattr(blocks[0].attn, "q_norm", nn.Identity()), nn.Identity):
            kwargs["qk_norm"] = True
        if not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity):
            kwargs["pre_norm"] = True
        if not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity):
            kwargs["fc_norm"] = True
        if hasattr(model, "pos_embed") and model.pos_embed is None and "depths" not in kwargs:
            kwargs["pos_embed"] = "none"
        specs = [ModelSpec(architecture, _accepted(type(model), kwargs))]
        fc2 = getattr(mlp, "fc2", None)
        if isinstance(fc2, nn.Module) and getattr(fc2, "in_features", None) != fc1.out_features:
            width = {"mlp_ratio": fc2.in_features / fc1.in_features}
            specs.append(ModelSpec(architecture, _accepted(type(model), {**kwargs, **width})))
        return specs

    def call_qkv_as_module(self, model: nn.Module) -> list[nn.Module]:
        """Make every attention that adds its q and v biases inside ``F.linear(x, qkv.weight, bias)`` (timm's BEiT,
        EVA and Swin V2) call ``qkv`` as a module and add the biases after it (their ``qkv_bias_separate`` path: the
        same function, to rounding). Reading ``qkv.weight`` directly would bypass the calibration's hooks and could
        not go through a factorized layer, which has no dense weight. Returns the attention modules switched (empty
        for every other family), so that a caller that must leave the model as it was can switch them back."""
        switched = []
        for block in model.modules():
            attn = getattr(block, "attn", None) if is_block(block) else None
            if getattr(attn, "qkv_bias_separate", True) is False and getattr(attn, "q_bias", None) is not None:
                attn.qkv_bias_separate = True
                switched.append(attn)
        return switched

    def build(self, spec: ModelSpec) -> nn.Module:
        model = timm_with_our_models().create_model(spec.architecture, pretrained=False, **spec.kwargs)
        self.call_qkv_as_module(model)  # as compress left it: a factorized qkv is only reachable as a module
        return model


def timm_with_our_models():
    """timm, with this package's own architectures registered in it (``nn/vssm.py``: ``vmamba_tiny``/``small``/
    ``base``, ``vssm_micro``): every place that finds a model by name imports timm through here."""
    import timm

    import lowrank_vit.nn.vssm  # noqa: F401  (registering is the import's effect)

    return timm


def get_adapter(model: nn.Module) -> TimmViTAdapter:
    """The adapter for ``model``; raises if the model has no compressible layer at all."""
    adapter = TimmViTAdapter()
    if not adapter.compressible_layers(model, include_factorized=True):
        raise ValueError(
            f"{type(model).__name__} has no compressible layer: expected blocks with attn.qkv/attn.proj (or a "
            "selective scan's op.in_proj/op.out_proj) and mlp.fc1/mlp.fc2 nn.Linear layers (timm ViT, DeiT, Swin, "
            "BEiT, EVA and their relatives; lowrank_vit's VMamba-style models)"
        )
    return adapter


def set_submodule(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (every parameter, trainable or not; shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


