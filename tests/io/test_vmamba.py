"""Tests of lowrank_vit/io/vmamba.py: VMamba's released classifiers load into nn/vssm.py's VSSM and compute what
VMamba computes.

The reference below is written from VMamba's public semantics (classification/models/vmamba.py, forward type
"v05_noz", norm "ln2d": channels-first maps throughout), directly on a state dict in VMamba's key layout, in float64
with a step-by-step scan; it shares no code with the library."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
from torch.nn import functional as F

from lowrank_vit.io.surgery import load_compressed, read_plan
from lowrank_vit.io.vmamba import (
    VMambaCheckpointError,
    convert_vmamba,
    is_vmamba_layout,
    load_vmamba,
    read_vmamba_checkpoint,
    vmamba_kwargs,
    vmamba_to_vssm,
)
from lowrank_vit.nn.adapters import timm_with_our_models
from lowrank_vit.nn.vssm import RELEASED, VSSM
from tests.helpers import cli, one_line_error, write_image_folder

# ---------------------------------------------------------------------------------------------------------------
# VMamba's forward, on its own keys


def _ln2d(x: torch.Tensor, sd: dict, key: str) -> torch.Tensor:
    """LayerNorm over the channels of a (b, c, h, w) map (VMamba's LayerNorm2d), eps 1e-5."""
    mean = x.mean(1, keepdim=True)
    var = x.var(1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + 1e-5) * sd[key + ".weight"][None, :, None, None] \
        + sd[key + ".bias"][None, :, None, None]


def _pointwise(x: torch.Tensor, sd: dict, key: str) -> torch.Tensor:
    """VMamba's Linear2d: a linear layer over the channels of a (b, c, h, w) map."""
    y = torch.einsum("bchw,oc->bohw", x, sd[key + ".weight"])
    return y + sd[key + ".bias"][None, :, None, None] if key + ".bias" in sd else y


def _paths(x: torch.Tensor) -> torch.Tensor:
    """(b, d, h, w) -> (b, 4, d, h w): row-major, column-major, and both reversed."""
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], 1)


def _unpaths(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Each path's outputs back at their pixels, the four summed: (b, 4, d, h w) -> (b, d, h, w)."""
    b, _, d, _ = y.shape
    out = y[:, 0].reshape(b, d, h, w) + y[:, 2].flip(-1).reshape(b, d, h, w)
    return out + (y[:, 1] + y[:, 3].flip(-1)).reshape(b, d, w, h).transpose(2, 3)


def _scan(u, delta, A, B, C, D) -> torch.Tensor:
    """The selective scan, one step at a time: h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = C_t h_t + D u_t.
    u, delta (b, k, d, l); A (k, d, n); B, C (b, k, n, l); D (k, d)."""
    state = torch.zeros(*u.shape[:3], A.shape[-1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[-1]):
        dt = delta[..., t, None]  # (b, k, d, 1)
        state = torch.exp(dt * A) * state + dt * B[:, :, None, :, t] * u[..., t, None]
        ys.append((state * C[:, :, None, :, t]).sum(-1))
    return torch.stack(ys, -1) + D[None, :, :, None] * u


def _ss2d(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    b, _, h, w = x.shape
    x = _pointwise(x, sd, p + "in_proj")  # no gate: in_proj gives the inner width only ("_noz")
    inner = x.shape[1]
    conv_w = sd[p + "conv2d.weight"]
    x = F.conv2d(x, conv_w, sd.get(p + "conv2d.bias"), padding=(conv_w.shape[-1] - 1) // 2, groups=inner)
    xs = _paths(F.silu(x))  # (b, 4, d, l)
    A_logs = sd[p + "A_logs"]
    n = A_logs.shape[1]
    proj = torch.einsum("bkdl,kcd->bkcl", xs, sd[p + "x_proj_weight"])
    rank = proj.shape[2] - 2 * n
    dts, Bs, Cs = proj[:, :, :rank], proj[:, :, rank:rank + n], proj[:, :, rank + n:]
    dts = torch.einsum("bkrl,kdr->bkdl", dts, sd[p + "dt_projs_weight"])
    delta = F.softplus(dts + sd[p + "dt_projs_bias"][None, :, :, None])
    A = -torch.exp(A_logs).reshape(4, inner, n)
    y = _scan(xs, delta, A, Bs, Cs, sd[p + "Ds"].reshape(4, inner))
    y = _ln2d(_unpaths(y, h, w), sd, p + "out_norm")
    return _pointwise(y, sd, p + "out_proj")


def vmamba_forward(sd: dict, images: torch.Tensor) -> torch.Tensor:
    """VMamba's classifier on a state dict in its layout (v2 or v1 stem, v2/v3 downsampling), in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = images.double()
    stem = sd["patch_embed.0.weight"]
    if "patch_embed.5.weight" in sd:  # conv, norm, GELU, conv, norm; stride patch/2, kernel stride + 1, padding 1
        stride = stem.shape[-1] - 1
        x = F.conv2d(x, stem, sd["patch_embed.0.bias"], stride=stride, padding=1)
        x = F.gelu(_ln2d(x, sd, "patch_embed.2"))
        x = F.conv2d(x, sd["patch_embed.5.weight"], sd["patch_embed.5.bias"], stride=stride, padding=1)
        x = _ln2d(x, sd, "patch_embed.7")
    else:
        x = F.conv2d(x, stem, sd["patch_embed.0.bias"], stride=stem.shape[-1])
        x = _ln2d(x, sd, "patch_embed.2")
    stages = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for i in range(stages):
        depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(f"layers.{i}.blocks."))
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            x = x + _ss2d(_ln2d(x, sd, p + "norm"), sd, p + "op.")
            hidden = F.gelu(_pointwise(_ln2d(x, sd, p + "norm2"), sd, p + "mlp.fc1"))
            x = x + _pointwise(hidden, sd, p + "mlp.fc2")
        if f"layers.{i}.downsample.1.weight" in sd:
            k = sd[f"layers.{i}.downsample.1.weight"].shape[-1]
            x = F.conv2d(x, sd[f"layers.{i}.downsample.1.weight"], sd[f"layers.{i}.downsample.1.bias"], stride=2,
                         padding=(k - 1) // 2)
            x = _ln2d(x, sd, f"layers.{i}.downsample.3")
    x = _ln2d(x, sd, "classifier.norm").mean((2, 3))
    return x @ sd["classifier.head.weight"].T + sd["classifier.head.bias"]


# ---------------------------------------------------------------------------------------------------------------
# random weights in VMamba's layout


def vmamba_state_dict(embed_dim: int, depths: list[int], ssm_ratio: float, d_state: int = 1, conv_bias: bool = False,
                      patch_embed: str = "v2", downsample: str = "v3", num_classes: int = 7, in_chans: int = 3,
                      mlp_ratio: float = 4.0, make=None, seed: int = 0, **_: object) -> dict[str, torch.Tensor]:
    """A state dict with VMamba's keys (as its VSSM's state_dict() names them) and shapes; ``make(shape)`` gives
    the values (default: random at scales where every part of the network matters)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def put(key: str, *shape: int, kind: str = "weight") -> None:
        if make is not None:
            sd[key] = make(shape)
            return
        if kind == "norm":
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif kind == "bias":
            sd[key] = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)

    def norm(key: str, c: int) -> None:
        put(key + ".weight", c, kind="norm")
        put(key + ".bias", c, kind="bias")

    if patch_embed == "v2":
        put("patch_embed.0.weight", embed_dim // 2, in_chans, 3, 3)
        put("patch_embed.0.bias", embed_dim // 2, kind="bias")
        norm("patch_embed.2", embed_dim // 2)
        put("patch_embed.5.weight", embed_dim, embed_dim // 2, 3, 3)
        put("patch_embed.5.bias", embed_dim, kind="bias")
        norm("patch_embed.7", embed_dim)
    else:
        put("patch_embed.0.weight", embed_dim, in_chans, 4, 4)
        put("patch_embed.0.bias", embed_dim, kind="bias")
        norm("patch_embed.2", embed_dim)
    for i, depth in enumerate(depths):
        dim = embed_dim * 2**i
        inner, rank = int(ssm_ratio * dim), math.ceil(dim / 16)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            norm(p + "norm", dim)
            put(p + "op.x_proj_weight", 4, rank + 2 * d_state, inner)
            put(p + "op.dt_projs_weight", 4, inner, rank)
            put(p + "op.dt_projs_bias", 4, inner, kind="bias")
            put(p + "op.A_logs", 4 * inner, d_state, kind="bias")
            put(p + "op.Ds", 4 * inner, kind="norm")
            put(p + "op.in_proj.weight", inner, dim)
            put(p + "op.conv2d.weight", inner, 1, 3, 3)
            if conv_bias:
                put(p + "op.conv2d.bias", inner, kind="bias")
            norm(p + "op.out_norm", inner)
            put(p + "op.out_proj.weight", dim, inner)
            norm(p + "norm2", dim)
            put(p + "mlp.fc1.weight", int(dim * mlp_ratio), dim)
            put(p + "mlp.fc1.bias", int(dim * mlp_ratio), kind="bias")
            put(p + "mlp.fc2.weight", dim, int(dim * mlp_ratio))
            put(p + "mlp.fc2.bias", dim, kind="bias")
        if i + 1 < len(depths):
            k = 3 if downsample == "v3" else 2
            put(f"layers.{i}.downsample.1.weight", 2 * dim, dim, k, k)
            put(f"layers.{i}.downsample.1.bias", 2 * dim, kind="bias")
            norm(f"layers.{i}.downsample.3", 2 * dim)
    norm("classifier.norm", embed_dim * 2 ** (len(depths) - 1))
    put("classifier.head.weight", num_classes, embed_dim * 2 ** (len(depths) - 1))
    put("classifier.head.bias", num_classes, kind="bias")
    if make is None:  # step sizes around 1 (softplus of the bias), so that the scans carry information along
        for key in [k for k in sd if k.endswith("dt_projs_bias")]:
            sd[key] = 0.5 + 0.5 * torch.randn(sd[key].shape, generator=g)
    return sd


# the released configurations' options, at a width and depth that run in a second
SMALL = {"vmamba_tiny_s1l8": {"embed_dim": 16, "depths": [1, 1, 1, 1]},
         "vmamba_small_s2l15": {"embed_dim": 16, "depths": [1, 1, 2, 1]},
         "vmamba_base_s2l15": {"embed_dim": 32, "depths": [1, 1, 1, 1]}}


def _small(name: str, **changes) -> dict[str, torch.Tensor]:
    return vmamba_state_dict(**{**RELEASED[name], **SMALL[name], **changes})


# ---------------------------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("name", sorted(SMALL))
def test_converted_weights_compute_vmambas_logits(name):
    sd = _small(name)
    converted, kwargs = vmamba_to_vssm(sd)
    model = VSSM(**kwargs, img_size=32)
    model.load_state_dict(converted, strict=True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.eval()(images)
    expected = vmamba_forward(sd, images)
    assert ours.shape == (2, 7)
    assert expected.std() > 0.1  # logits that vary, so that agreement means something
    assert torch.allclose(ours.double(), expected, atol=1e-5, rtol=1e-5), (ours.double() - expected).abs().max()


@pytest.mark.parametrize("changes", [{"patch_embed": "v1", "conv_bias": True}, {"d_state": 3, "downsample": "v2"}])
def test_other_stems_downsamplings_and_states_also_agree(changes):
    sd = _small("vmamba_tiny_s1l8", depths=[1, 1], **changes)
    converted, kwargs = vmamba_to_vssm(sd)
    model = VSSM(**kwargs, img_size=32)
    model.load_state_dict(converted, strict=True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.eval()(images)
    assert torch.allclose(ours.double(), vmamba_forward(sd, images), atol=1e-5, rtol=1e-5)


def test_the_reference_scan_is_the_one_the_library_checks_against():
    """The reference's step-by-step scan agrees with the library's own reference scan on the same arguments (a
    check of the test's reference, whose conventions for A, B, C, D are VMamba's)."""
    from lowrank_vit.core.scan import selective_scan_reference

    g = torch.Generator().manual_seed(0)
    b, k, d, n, length = 2, 4, 3, 2, 5
    u, delta = torch.randn(b, k, d, length, generator=g), torch.rand(b, k, d, length, generator=g)
    A, D = -torch.rand(k, d, n, generator=g), torch.randn(k, d, generator=g)
    B, C = torch.randn(b, k, n, length, generator=g), torch.randn(b, k, n, length, generator=g)
    ours = selective_scan_reference(u.reshape(b, k * d, length), delta.reshape(b, k * d, length),
                                    A.reshape(k * d, n), B, C, D.reshape(k * d))
    assert torch.allclose(ours.reshape(b, k, d, length), _scan(u, delta, A, B, C, D), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the released shapes


@pytest.mark.parametrize("name, millions", [("vmamba_tiny_s1l8", 30.25), ("vmamba_small_s2l15", 50.15),
                                            ("vmamba_base_s2l15", 88.56)])
def test_the_registered_released_shapes_are_what_vmambas_full_size_layout_converts_to(name, millions):
    full = {**RELEASED[name], "depths": list(RELEASED[name]["depths"]), "num_classes": 1000}
    shapes = vmamba_state_dict(**full, make=lambda shape: torch.empty(shape, device="meta"))
    converted, kwargs = convert_vmamba(shapes)
    with torch.device("meta"):
        model = timm_with_our_models().create_model(name, pretrained=False)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in converted.items()}
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)
    assert {k: kwargs[k] for k in ("embed_dim", "d_state", "patch_embed", "conv_bias")} == \
        {k: RELEASED[name][k] for k in ("embed_dim", "d_state", "patch_embed", "conv_bias")}


def test_layout_detection():
    sd = _small("vmamba_tiny_s1l8")
    assert is_vmamba_layout(sd)
    assert not is_vmamba_layout(vmamba_to_vssm(sd)[0])


# ---------------------------------------------------------------------------------------------------------------
# bad state dicts


def test_a_missing_key_is_named():
    sd = _small("vmamba_tiny_s1l8")
    del sd["layers.1.blocks.0.op.Ds"]
    with pytest.raises(VMambaCheckpointError, match=r"missing key 'layers\.1\.blocks\.0\.op\.Ds'"):
        convert_vmamba(sd)


def test_an_extra_key_is_named():
    sd = _small("vmamba_tiny_s1l8")
    sd["layers.0.blocks.0.op.x_proj_bias"] = torch.zeros(4, 3)
    with pytest.raises(VMambaCheckpointError, match=r"unexpected key 'layers\.0\.blocks\.0\.op\.x_proj_bias'"):
        convert_vmamba(sd)


def test_a_missing_key_the_inference_reads_is_named():
    sd = _small("vmamba_tiny_s1l8")
    del sd["layers.0.blocks.0.op.A_logs"]
    with pytest.raises(VMambaCheckpointError, match=r"missing key 'layers\.0\.blocks\.0\.op\.A_logs'"):
        vmamba_kwargs(sd)


def test_a_wrong_shape_is_named():
    sd = _small("vmamba_tiny_s1l8")
    sd["layers.2.blocks.0.op.out_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(VMambaCheckpointError, match=r"layers\.2\.blocks\.0\.op\.out_proj\.weight"):
        vmamba_to_vssm(sd)


def test_the_gated_forward_types_are_refused_clearly():
    sd = _small("vmamba_tiny_s1l8")
    sd["layers.0.blocks.0.op.in_proj.weight"] = torch.zeros(32, 16)  # in_proj to x and the gate z
    with pytest.raises(VMambaCheckpointError, match="_noz"):
        vmamba_kwargs(sd)


def test_conversion_leaves_its_input_alone():
    sd = _small("vmamba_tiny_s1l8")
    before = {k: v.clone() for k, v in sd.items()}
    converted, _ = convert_vmamba(sd)
    converted["layers.0.blocks.0.op.x_proj.0.weight"].add_(1)
    assert sd.keys() == before.keys() and all(torch.equal(sd[k], before[k]) for k in sd)


# ---------------------------------------------------------------------------------------------------------------
# the file


def test_a_training_checkpoint_reads_through_its_model_entry(tmp_path):
    sd = _small("vmamba_tiny_s1l8")
    path = tmp_path / "ckpt_epoch_1.pth"
    torch.save({"model": sd, "epoch": 1, "max_accuracy": 0.5, "optimizer": {"state": {}, "param_groups": []}}, path)
    read = read_vmamba_checkpoint(path)
    assert read.keys() == sd.keys() and all(torch.equal(read[k], sd[k]) for k in sd)
    model = load_vmamba(path, img_size=32)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(images).double(), vmamba_forward(sd, images), atol=1e-5, rtol=1e-5)


class CfgNode(dict):
    """A stand-in for yacs' CfgNode as pickled (a dict with attributes), which VMamba's script saves as ``config``."""

    def __init__(self, init=None):
        super().__init__(init or {})
        self.__dict__.update({"__immutable__": False, "__deprecated_keys__": set(), "__renamed_keys__": {},
                              "__new_allowed__": False})


def test_the_training_configuration_beside_the_weights_is_read_as_a_plain_dict(tmp_path, monkeypatch):
    package, module = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    package.config, module.CfgNode = module, CfgNode
    monkeypatch.setitem(sys.modules, "yacs", package)
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    monkeypatch.setattr(CfgNode, "__module__", "yacs.config")
    sd = _small("vmamba_tiny_s1l8")
    path = tmp_path / "with_config.pth"
    torch.save({"model": sd, "config": CfgNode({"MODEL": CfgNode({"NAME": "vssm1_tiny_0230s"})})}, path)
    monkeypatch.delitem(sys.modules, "yacs.config")  # reading imports nothing of yacs
    assert read_vmamba_checkpoint(path).keys() == sd.keys()


class Payload:
    """An object whose unpickling would run code: it must never be unpickled."""

    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize("obj", [Payload(), {"model": {"a": torch.zeros(1)}, "extra": Payload()}])
def test_a_file_holding_python_objects_is_refused_in_one_line_naming_it(tmp_path, obj, capsys):
    path = tmp_path / "evil.pth"
    torch.save(obj, path)
    with pytest.raises(VMambaCheckpointError) as err:
        read_vmamba_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "weights-only" in message
    assert "unpickled!" not in capsys.readouterr().out


def test_a_file_that_is_not_pytorch_is_refused_naming_it(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(VMambaCheckpointError, match="notes.pth"):
        read_vmamba_checkpoint(path)
    with pytest.raises(VMambaCheckpointError, match="does not exist"):
        read_vmamba_checkpoint(tmp_path / "absent.pth")


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_pytorch_file_is_refused_naming_it(tmp_path, damage):
    """A file cut short in a download (or empty) is refused on one line that names the file and says it is not a
    readable PyTorch file (torch's EOFError or RuntimeError, not an unpickling refusal)."""
    torch.save({"model": {"a": torch.zeros(64)}}, tmp_path / "whole.pth")
    whole = (tmp_path / "whole.pth").read_bytes()
    path = tmp_path / f"{damage}.pth"
    path.write_bytes(b"" if damage == "empty" else whole[: len(whole) // 2])
    with pytest.raises(VMambaCheckpointError) as err:
        read_vmamba_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"VMamba checkpoint {str(path)!r} is not a readable PyTorch file (")


@pytest.mark.parametrize(("words", "reason"), [
    ("WeightsUnpickler error: Unsupported global: GLOBAL \x1b[1mevil.Payload\x1b[0m was not an allowed global by "
     "default.", "it names evil.Payload"),
    ("\x1b[31mWeightsUnpickler error: Can only build Tensor, Parameter or OrderedDict\x1b[0m",
     "WeightsUnpickler error: Can only build Tensor, Parameter or OrderedDict"),
], ids=["global", "error-line"])
def test_a_refusal_coloured_for_a_terminal_is_quoted_without_its_colour_codes(tmp_path, monkeypatch, words, reason):
    """torch's weights-only refusal carries terminal escape codes (2.14 sets a sentence of it in bold); wherever such
    codes fall (around the global's name, around the error line), the refusal is quoted by its words alone, so the
    one-line message reads the same in a log file as on a terminal. torch.load is a stand-in raising such a refusal."""
    import pickle

    path = tmp_path / "evil.pth"
    path.write_bytes(b"anything")

    def load(*args, **kwargs):
        raise pickle.UnpicklingError(f"Weights only load failed. \x1b[1mTrust it?\x1b[0m\n\t{words}\n\nSee the docs.")

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(VMambaCheckpointError) as err:
        read_vmamba_checkpoint(path)
    assert f"weights-only loading refuses ({reason});" in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# the command line


@pytest.fixture(scope="module")
def vmamba_file(tmp_path_factory):
    """A tiny VMamba (the released tiny's options, width 16, two stages) saved as VMamba's script saves it, and an
    image folder it can classify."""
    root = tmp_path_factory.mktemp("vmamba")
    write_image_folder(root / "imgs", 3, 4, 32)
    sd = _small("vmamba_tiny_s1l8", depths=[1, 1], num_classes=3)
    torch.save({"model": sd, "epoch": 3}, root / "ckpt_epoch_3.pth")
    return root


def _compress(capsys, images, model: str, checkpoint, out, *extra: str) -> tuple[int, str, str]:
    return cli(capsys, "compress", model, "--checkpoint", str(checkpoint), "--input-size", "3,32,32", "--data",
               str(images), "--workers", "0", "--calib-samples", "8", "--reduction", "0.3", "--preprocessing", "timm",
               "--device", "cpu", "--quiet", "--output", str(out), *extra)


def test_compress_reads_a_vmamba_checkpoint(vmamba_file, capsys):
    out = vmamba_file / "out"
    code, _, err = _compress(capsys, vmamba_file / "imgs", "vssm_micro", vmamba_file / "ckpt_epoch_3.pth", out)
    assert code == 0, err
    kwargs = read_plan(out)["model_kwargs"]
    assert kwargs["patch_embed"] == "v2" and kwargs["conv_bias"] is False and kwargs["depths"] == [1, 1]
    model = load_compressed(out)
    assert isinstance(model, VSSM) and model.num_classes == 3


def test_vmeanba_runs_on_a_vmamba_checkpoint_from_the_command_line(vmamba_file, capsys):
    """VMeanba alone (its channel-mean scan in one block of the released layout's two), then VMeanba with the low-rank
    default beside it: both saved models load with the switched block."""
    from lowrank_vit.methods.vmeanba import scan_blocks

    alone = vmamba_file / "vmeanba"
    code, _, err = cli(capsys, "compress", "vssm_micro", "--checkpoint", str(vmamba_file / "ckpt_epoch_3.pth"),
                       "--input-size", "3,32,32", "--data", str(vmamba_file / "imgs"), "--workers", "0",
                       "--calib-samples", "8", "--preprocessing", "timm", "--device", "cpu", "--quiet", "--no-timing",
                       "--recipe", "vmeanba", "--vmeanba-blocks", "1", "--output", str(alone))
    assert code == 0, err
    combined = vmamba_file / "vmeanba-lowrank"
    code, _, err = _compress(capsys, vmamba_file / "imgs", "vssm_micro", vmamba_file / "ckpt_epoch_3.pth", combined,
                             "--no-timing", "--vmeanba-blocks", "1")
    assert code == 0, err
    for out in (alone, combined):
        switched = [block for block, op in scan_blocks(load_compressed(out)).items() if op.mean_scan]
        assert len(switched) == 1, (out, switched)


def test_compress_refuses_model_kwargs_that_contradict_the_vmamba_checkpoint(vmamba_file, capsys):
    code, _, err = _compress(capsys, vmamba_file / "imgs", "vmamba_tiny", vmamba_file / "ckpt_epoch_3.pth",
                             vmamba_file / "refused", "--model-kwargs", json.dumps({"embed_dim": 24}))
    assert code != 0
    line = one_line_error(err)
    assert "embed_dim=16" in line and "ckpt_epoch_3.pth" in line


def test_compress_refuses_a_vmamba_file_holding_python_objects(vmamba_file, tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model": _small("vmamba_tiny_s1l8"), "extra": Payload()}, path)
    code, out, err = _compress(capsys, vmamba_file / "imgs", "vmamba_tiny", path, tmp_path / "out")
    assert code != 0 and "unpickled!" not in out
    assert "evil.pth" in one_line_error(err)


def test_other_models_still_read_pytorch_files_as_before(tmp_path):
    """A vmamba name with a state dict in this library's own layout loads as it always did."""
    from lowrank_vit.repro.models import build_model
    from lowrank_vit.repro.registry import ModelConfig

    torch.manual_seed(0)
    model = VSSM(img_size=32, embed_dim=16, depths=[1, 1], num_classes=3)
    path = tmp_path / "own.pth"
    torch.save(model.state_dict(), path)
    loaded = build_model(ModelConfig("timm", "vssm_micro", pretrained=False, checkpoint=str(path),
                                     kwargs={"img_size": 32, "embed_dim": 16, "depths": [1, 1], "num_classes": 3}))
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
