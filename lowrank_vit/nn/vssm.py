"""A VMamba-style vision state-space model in plain PyTorch (no CUDA kernel), registered with timm.

VMamba (Liu et al., 2024) replaces attention by SS2D: the feature map is read along four paths (rows, columns, and
both backwards), each path runs a selective scan (``core/scan.py``), and the four outputs are added back on the map.
The model here follows its later configuration (d_state 1, ssm_ratio 1, no output gate, an MLP in every block, a
convolutional stem and downsampling): ``vmamba_tiny``/``small``/``base`` have the published sizes (about 30M, 50M
and 89M parameters) and are built with random weights like every full-size model here; ``vssm_micro`` is the tiny
stand-in of the smoke scale. Its linear layers are ``nn.Linear`` modules that the adapter lists: ``op.in_proj``,
``op.x_proj.K`` and ``op.dt_proj.K`` (one per path K), ``op.out_proj``, ``mlp.fc1``, ``mlp.fc2``.

VMamba's released classifiers (VMamba-T s1l8, -S and -B s2l15) are registered as ``vmamba_tiny_s1l8``,
``vmamba_small_s2l15`` and ``vmamba_base_s2l15`` (:data:`RELEASED`): the same blocks with VMamba's "v2" stem (two
stride-2 convolutions), depthwise convolutions without bias, and ssm_ratio 2 for S and B. Their ``.pth`` files load
through ``lowrank_vit/io/vmamba.py``, which unstacks VMamba's per-path parameters into the modules above. The options
(``patch_embed``, ``downsample``, ``conv_bias``, ``d_conv``, ``dt_rank``) default to None, the form the model had
before them, and are recorded in ``build_kwargs`` only when given, so that earlier models and saves are unchanged.

``SS2D.mean_scan`` switches a block to VMeanba's channel-mean scan (``core.scan.channel_mean_scan``); the
parameters stay the same, so a model with some blocks switched saves and loads as the same state dict plus the
list of switched blocks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model
from torch import nn
from torch.nn import functional as F

from lowrank_vit.core.scan import channel_mean_scan, selective_scan

PATHS = 4  # rows, columns, rows backwards, columns backwards


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) -> (b, 4, c, h w): the map read along rows, along columns, and both of them backwards."""
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse reading of :func:`cross_scan`, the four paths added: (b, 4, c, h w) -> (b, c, h, w)."""
    b, _, c, _ = ys.shape
    rows = ys[:, 0] + ys[:, 2].flip(-1)
    cols = ys[:, 1] + ys[:, 3].flip(-1)
    return rows.reshape(b, c, h, w) + cols.reshape(b, c, w, h).transpose(2, 3)


class SS2D(nn.Module):
    """The 2-D selective scan mixer. Input and output (b, h, w, dim)."""

    def __init__(self, dim: int, d_state: int = 1, ssm_ratio: float = 1.0, d_conv: int = 3, conv_bias: bool = True,
                 dt_rank: int | str = "auto") -> None:
        super().__init__()
        inner = int(ssm_ratio * dim)
        # VMamba's "auto" rank of the step-size projection: one per 16 channels of the block's width
        self.inner, self.d_state = inner, d_state
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.mean_scan = False
        self.in_proj = nn.Linear(dim, inner, bias=False)
        # VMamba pads the depthwise convolution by (d_conv - 1) // 2, which is d_conv // 2 for its odd sizes
        self.conv2d = nn.Conv2d(inner, inner, d_conv, padding=(d_conv - 1) // 2, groups=inner, bias=conv_bias)
        self.x_proj = nn.ModuleList(nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False) for _ in range(PATHS))
        self.dt_proj = nn.ModuleList(nn.Linear(self.dt_rank, inner, bias=True) for _ in range(PATHS))
        # S4D-real initialisation: A_n = -n; step sizes between 1e-3 and 1e-1 through the dt bias (softplus inverse)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(PATHS * inner, 1))
        self.D = nn.Parameter(torch.ones(PATHS * inner))
        with torch.no_grad():
            for proj in self.dt_proj:
                nn.init.uniform_(proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
                dt = torch.exp(torch.rand(inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
                proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def scan_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The selective scan's arguments for (b, h, w, dim) features: u, delta (b, 4 inner, h w), A, B, C, D."""
        b, h, w, _ = x.shape
        x = F.silu(self.conv2d(self.in_proj(x).permute(0, 3, 1, 2)))
        xs = cross_scan(x)  # (b, 4, inner, l)
        deltas, Bs, Cs = [], [], []
        for k in range(PATHS):
            tokens = xs[:, k].transpose(1, 2)  # (b, l, inner)
            dt, B, C = self.x_proj[k](tokens).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            deltas.append(self.dt_proj[k](dt))
            Bs.append(B)
            Cs.append(C)
        delta = F.softplus(torch.stack(deltas, 1)).transpose(2, 3).reshape(b, PATHS * self.inner, h * w)
        B = torch.stack(Bs, 1).transpose(2, 3)  # (b, 4, n, l)
        C = torch.stack(Cs, 1).transpose(2, 3)
        return xs.reshape(b, PATHS * self.inner, h * w), delta, -torch.exp(self.A_log.float()), B, C, self.D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        scan = channel_mean_scan if self.mean_scan else selective_scan
        y = scan(*self.scan_inputs(x))
        y = cross_merge(y.reshape(b, PATHS, self.inner, h * w), h, w)
        return self.out_proj(self.out_norm(y.permute(0, 2, 3, 1)))


class VSSBlock(nn.Module):
    """Pre-norm residual block: x + SS2D(norm(x)), then x + MLP(norm(x)). Input and output (b, h, w, dim)."""

    def __init__(self, dim: int, d_state: int = 1, ssm_ratio: float = 1.0, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, **ss2d: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, d_state, ssm_ratio, **ss2d)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """A strided convolution to patch_size x patch_size patches, channels last, then LayerNorm."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchEmbedV2(nn.Module):
    """VMamba's "v2" stem: two overlapping convolutions of stride patch_size / 2 (kernel stride + 1, padding 1), the
    first to half the width followed by LayerNorm and GELU, the second to the full width followed by LayerNorm.
    The first convolution keeps the name ``proj`` (timm's ``first_conv``)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        if patch_size < 2 or patch_size % 2:
            raise ValueError(f"the v2 patch embedding halves patch_size between two convolutions: give an even "
                             f"patch_size, not {patch_size}")
        self.img_size, self.patch_size = (img_size, img_size), patch_size
        stride = patch_size // 2
        self.proj = nn.Conv2d(in_chans, dim // 2, stride + 1, stride=stride, padding=1)
        self.norm1 = nn.LayerNorm(dim // 2)
        self.act = nn.GELU()
        self.proj2 = nn.Conv2d(dim // 2, dim, stride + 1, stride=stride, padding=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return self.norm(self.proj2(x).permute(0, 2, 3, 1))


PATCH_EMBEDS = {"v1": PatchEmbed, "v2": PatchEmbedV2}
DOWNSAMPLE_KERNELS = {"v2": 2, "v3": 3}
"""VMamba's convolutional downsampling versions: "v2" a 2x2 stride-2 convolution, "v3" a 3x3 one padded by 1 (its
"v1", Swin's patch merging, is not built here)."""


class Downsample(nn.Module):
    """Halves h and w and changes the width: a stride-2 convolution (3x3 padded by 1, VMamba's "v3", or 2x2, its
    "v2"), then LayerNorm."""

    def __init__(self, dim: int, out: int, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out, kernel, stride=2, padding=(kernel - 1) // 2)
        self.norm = nn.LayerNorm(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Stage(nn.Module):
    def __init__(self, dim: int, depth: int, out: int | None, drop_paths: list[float], downsample_kernel: int = 3,
                 **block: Any) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(VSSBlock(dim, drop_path=p, **block) for p in drop_paths[:depth]))
        self.downsample = Downsample(dim, out, downsample_kernel) if out is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.blocks(x))


class VSSM(nn.Module):
    """Patch embedding, stages of VSS blocks (each but the last ends by halving the map and doubling the width),
    LayerNorm, global average pooling and a linear head."""

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: tuple[int, ...] | list[int] = (2, 2, 8, 2), d_state: int = 1,
                 ssm_ratio: float = 1.0, mlp_ratio: float = 4.0, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 patch_embed: str | None = None, downsample: str | None = None, conv_bias: bool | None = None,
                 d_conv: int | None = None, dt_rank: int | str | None = None, **kwargs: Any) -> None:
        super().__init__()
        kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
        if kwargs:
            raise TypeError(f"VSSM got unexpected arguments: {', '.join(sorted(kwargs))}")
        # the options VMamba's released shapes set; None is the form this model had before them ("v1" stem, "v3"
        # downsampling, a 3x3 convolution with bias, dt rank "auto")
        given = {k: v for k, v in {"patch_embed": patch_embed, "downsample": downsample, "conv_bias": conv_bias,
                                   "d_conv": d_conv, "dt_rank": dt_rank}.items() if v is not None}
        patch_embed, downsample = patch_embed or "v1", downsample or "v3"
        conv_bias = True if conv_bias is None else bool(conv_bias)
        d_conv = 3 if d_conv is None else int(d_conv)
        dt_rank = "auto" if dt_rank is None else dt_rank
        if patch_embed not in PATCH_EMBEDS:
            raise ValueError(f"VSSM patch_embed={patch_embed!r}: give one of {', '.join(PATCH_EMBEDS)}")
        if downsample not in DOWNSAMPLE_KERNELS:
            raise ValueError(f"VSSM downsample={downsample!r}: give one of {', '.join(DOWNSAMPLE_KERNELS)} (VMamba's "
                             "v1, patch merging, is not built here)")
        if dt_rank != "auto" and (isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 1):
            raise ValueError(f"VSSM dt_rank={dt_rank!r}: give \"auto\" (ceil(width / 16)) or a positive integer")
        depths = [int(d) for d in depths]
        # the constructor arguments that shape the parameters: what the adapter saves to rebuild the model
        self.build_kwargs = {"img_size": int(img_size), "patch_size": int(patch_size), "in_chans": int(in_chans),
                             "num_classes": int(num_classes), "embed_dim": int(embed_dim), "depths": depths,
                             "d_state": int(d_state), "ssm_ratio": float(ssm_ratio), "mlp_ratio": float(mlp_ratio)}
        # the later options only where they were given: a model built as before records (and saves) exactly the
        # arguments it did before, and one built with them (VMamba's released shapes) rebuilds under any timm name
        options = {"patch_embed": patch_embed, "downsample": downsample, "conv_bias": conv_bias, "d_conv": d_conv,
                   "dt_rank": dt_rank}
        self.build_kwargs.update({k: options[k] for k in given})
        self.num_classes = num_classes
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = dims[-1]
        n = sum(depths)  # linearly rising stochastic depth, in plain Python so that it builds on the meta device too
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        self.patch_embed = PATCH_EMBEDS[patch_embed](img_size, patch_size, in_chans, embed_dim)
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(Stage(dims[i], depth, dims[i + 1] if i + 1 < len(dims) else None,
                                     rates[start:start + depth], DOWNSAMPLE_KERNELS[downsample], d_state=d_state,
                                     ssm_ratio=ssm_ratio, mlp_ratio=mlp_ratio, d_conv=d_conv, conv_bias=conv_bias,
                                     dt_rank=dt_rank))
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and ".dt_proj." not in name:  # dt_proj keeps SS2D's initialisation
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(1, 2)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {"num_classes": 1000, "input_size": (3, 224, 224), "crop_pct": 0.9, "interpolation": "bicubic",
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "first_conv": "patch_embed.proj",
            "classifier": "head", **kwargs}


class NoPretrainedWeightsError(ValueError):
    """The model is defined here, but no trained weights for it ship with the library or timm's hub."""


def _create(name: str, pretrained: bool, defaults: dict[str, Any], **kwargs: Any) -> VSSM:
    if pretrained:
        where = (f" (VMamba's released {RELEASED_FILES[name]} loads as one: lowrank_vit.io.vmamba)"
                 if name in RELEASED_FILES else "")
        raise NoPretrainedWeightsError(f"{name} has no pretrained weights here: build it with pretrained=False and "
                                       f"load a checkpoint{where}")
    from timm.models import build_model_with_cfg

    return build_model_with_cfg(VSSM, name, pretrained=False, **{**defaults, **kwargs})


RELEASED_OPTIONS: dict[str, Any] = {"d_state": 1, "mlp_ratio": 4.0, "conv_bias": False, "d_conv": 3,
                                    "patch_embed": "v2", "downsample": "v3"}
"""What VMamba's three released ImageNet-1k classifiers share (its configs ``vmambav2v_tiny_224.yaml`` and
``vmambav2_small_224.yaml``/``vmambav2_base_224.yaml``): forward type ``v05_noz`` (no output gate, LayerNorm on
the merged scan), d_state 1, dt rank "auto", a 3x3 depthwise convolution without bias, the "v2" stem, the "v3"
downsampling, MLP ratio 4. Their ``ln2d`` norm is LayerNorm over channels on a channels-first map, which computes
what LayerNorm on a channels-last map does; their ``Linear2d`` 1x1 convolutions likewise are these linear layers."""

RELEASED: dict[str, dict[str, Any]] = {
    "vmamba_tiny_s1l8": {**RELEASED_OPTIONS, "embed_dim": 96, "depths": (2, 2, 8, 2), "ssm_ratio": 1.0},
    "vmamba_small_s2l15": {**RELEASED_OPTIONS, "embed_dim": 96, "depths": (2, 2, 15, 2), "ssm_ratio": 2.0},
    "vmamba_base_s2l15": {**RELEASED_OPTIONS, "embed_dim": 128, "depths": (2, 2, 15, 2), "ssm_ratio": 2.0},
}
"""timm names of the released shapes (VMamba's own function names) and their constructor arguments."""

RELEASED_FILES = {"vmamba_tiny_s1l8": "vssm1_tiny_0230s_ckpt_epoch_264.pth",
                  "vmamba_small_s2l15": "vssm_small_0229_ckpt_epoch_222.pth",
                  "vmamba_base_s2l15": "vssm_base_0229_ckpt_epoch_237.pth"}
"""The checkpoint files VMamba's README links for each released shape (its GitHub release "#v2cls")."""

# the released shapes carry VMamba's evaluation preprocessing (ImageNet mean and std, bicubic resizing to 256/224 of
# the input, then a centre crop): what ``--preprocessing timm`` gives for them
default_cfgs = generate_default_cfgs({name: _cfg() for name in ("vmamba_tiny", "vmamba_small", "vmamba_base")}
                                     | {name: _cfg(crop_pct=0.875) for name in RELEASED}
                                     | {"vssm_micro": _cfg(input_size=(3, 32, 32), crop_pct=1.0)})


@register_model
def vmamba_tiny(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-T's shape: width 96, depths 2-2-8-2 (about 30M parameters)."""
    return _create("vmamba_tiny", pretrained, {"embed_dim": 96, "depths": (2, 2, 8, 2)}, **kwargs)


@register_model
def vmamba_small(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-S's shape: width 96, depths 2-2-20-2 (about 50M parameters)."""
    return _create("vmamba_small", pretrained, {"embed_dim": 96, "depths": (2, 2, 20, 2)}, **kwargs)


@register_model
def vmamba_base(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-B's shape: width 128, depths 2-2-20-2 (about 89M parameters)."""
    return _create("vmamba_base", pretrained, {"embed_dim": 128, "depths": (2, 2, 20, 2)}, **kwargs)


@register_model
def vssm_micro(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """A stand-in for tests and the smoke scale: width 16, depths 1-1."""
    return _create("vssm_micro", pretrained, {"embed_dim": 16, "depths": (1, 1)}, **kwargs)


@register_model
def vmamba_tiny_s1l8(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-T as released (82.6% top-1, ``vssm1_tiny_0230s_ckpt_epoch_264.pth``): width 96, depths 2-2-8-2,
    ssm_ratio 1, the v2 stem, convolutions without bias (about 30M parameters)."""
    return _create("vmamba_tiny_s1l8", pretrained, RELEASED["vmamba_tiny_s1l8"], **kwargs)


@register_model
def vmamba_small_s2l15(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-S as released (83.6%, ``vssm_small_0229_ckpt_epoch_222.pth``): width 96, depths 2-2-15-2, ssm_ratio 2
    (about 50M parameters)."""
    return _create("vmamba_small_s2l15", pretrained, RELEASED["vmamba_small_s2l15"], **kwargs)


@register_model
def vmamba_base_s2l15(pretrained: bool = False, **kwargs: Any) -> VSSM:
    """VMamba-B as released (83.9%, ``vssm_base_0229_ckpt_epoch_237.pth``): width 128, depths 2-2-15-2, ssm_ratio 2
    (about 89M parameters)."""
    return _create("vmamba_base_s2l15", pretrained, RELEASED["vmamba_base_s2l15"], **kwargs)


MODEL_NAMES = ("vmamba_tiny", "vmamba_small", "vmamba_base", "vssm_micro", *RELEASED)
"""The timm names registered here."""
