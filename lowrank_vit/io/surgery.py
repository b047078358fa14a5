"""Model surgery: the one layer-swap walk, and save/load of compressed models (safetensors + a JSON plan).

A saved model is a directory with ``model.safetensors`` (every tensor; quantized parameters as integer codes plus
per-channel scale and zero point) and ``lowrank_vit.json`` (how to rebuild the dense timm model, and the spec of every
factorized layer, for COMCAT of every factorized attention module, for VMeanba the list of selective-scan mixers that
run the channel-mean scan). Nothing is pickled; loading never executes code from the files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank_vit.core.files import atomic_write
from lowrank_vit.core.likelihood import output_parts
from lowrank_vit.io.hub import download, is_hub_reference, push
from lowrank_vit.nn.adapters import ModelSpec, TimmViTAdapter, get_adapter, is_scan, set_submodule
from lowrank_vit.nn.comcat import FactorizedAttention
from lowrank_vit.nn.factorized import Z_MODULES, FactorizedLinear
from lowrank_vit.nn.quantize import QUANT_ATTR, QuantizedTensor, quantization_record, quantize_tensor

FORMAT = "lowrank_vit"
FORMAT_VERSION = 1
PLAN_FILE = "lowrank_vit.json"
WEIGHTS_FILE = "model.safetensors"


def swap_layers(model: nn.Module, build: Callable[[str, nn.Module], nn.Module | None],
                layer_filter: Callable[[str, nn.Module], bool]) -> list[str]:
    """Replace every module for which ``layer_filter(fqn, module)`` holds by ``build(fqn, module)``.

    ``build`` may return ``None`` to keep a module. Candidates are collected before any replacement, so a new module
    is never visited. Returns the names of the replaced modules.
    """
    candidates = [(fqn, m) for fqn, m in model.named_modules() if fqn and layer_filter(fqn, m)]
    replaced = []
    for fqn, module in candidates:
        new = build(fqn, module)
        if new is not None:
            set_submodule(model, fqn, new)
            replaced.append(fqn)
    return replaced


def fold_lowrank_z_(model: nn.Module) -> list[str]:
    """Fold, in place, every factorized layer's low-rank Z into its factors: ``(x U) V^T + (x G) Y^T =
    x [U G] [V Y]^T``. The same function and the same parameter count with two thin products per layer instead of
    four, which is faster at inference (benchmarks/README.md). Meant for deployment after fine-tuning (the folded
    layer no longer tells Z from U V^T); quantize after folding, not before. Returns the folded layers' names.

    Raises:
        ValueError: the model is already quantized.
    """
    if quantization_record(model):
        raise ValueError("fold_lowrank_z_ needs an unquantized model: fold first, then quantize")

    def fold(fqn: str, layer: nn.Module) -> nn.Module | None:
        factors = None if layer.z is None else layer.z.lowrank_factors()
        if factors is None:
            return None
        G, Y = factors
        U = torch.cat([layer.U.detach(), G.detach().to(layer.U.dtype)], dim=1)
        V = torch.cat([layer.V.detach(), Y.detach().to(layer.V.dtype)], dim=1)
        return FactorizedLinear.from_factors(U, V, None if layer.bias is None else layer.bias.detach())

    return swap_layers(model, fold, lambda _, module: isinstance(module, FactorizedLinear))


def _check_layer_specs(layers: dict[str, Any], origin: str) -> None:
    """Raise a ValueError naming ``origin`` (the plan file, or "this model's plan"), the layer and the field unless
    every factorized layer's spec has positive integer sizes and a known Z kind with positive sizes. Checked before
    the rebuild: a negative size reaches ``torch.zeros`` as a bare RuntimeError, a zero one an empty factor."""
    def check(spec: dict[str, Any], fields: tuple[str, ...], where: str) -> None:
        for field in fields:
            value = spec.get(field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{origin} is malformed: {where}: {field!r} must be a positive integer, not {value!r}")

    for fqn, spec in layers.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{origin} is malformed: layer {fqn} is not a dict")
        check(spec, ("in_features", "out_features", "rank"), f"layer {fqn}")
        z = spec.get("z")
        if z is None:
            continue
        if not isinstance(z, dict):
            raise ValueError(f"{origin} is malformed: layer {fqn} has a bad 'z' entry")
        if z.get("kind") not in Z_MODULES:
            raise ValueError(f"{origin} is malformed: layer {fqn}: unknown compensation kind {z.get('kind')!r}; "
                             f"known: {', '.join(Z_MODULES)}")
        check(z, Z_MODULES[z["kind"]].spec_fields, f"layer {fqn} z")


OWN_MODEL = "own:"
"""The plan's ``architecture`` of a model of one's own class (``own:module.Class``): no timm name rebuilds it, so
:func:`load_compressed` loads into the dense model the caller gives."""


def _rebuild(plan: dict[str, Any], origin: str, dense: nn.Module | None = None) -> nn.Module:
    """The dense timm model the plan names (or ``dense``, the caller's own, changed in place), with the plan's
    factorized layers and attention modules swapped in (random weights). ``origin`` (the plan file, or "this model")
    words the errors."""
    if dense is not None:
        model = dense
    elif plan["architecture"].startswith(OWN_MODEL):
        raise ValueError(f"{origin} holds a model of its own class ({plan['architecture'][len(OWN_MODEL):]}), which "
                         "no timm name rebuilds: pass the dense model to load into, load_compressed(path, model=...)")
    else:
        try:
            model = TimmViTAdapter().build(ModelSpec(plan["architecture"], plan["model_kwargs"]))
        except Exception as exc:  # timm raises RuntimeError/TypeError/... for unknown names or bad kwargs
            raise ValueError(f"cannot rebuild timm model {plan['architecture']!r} with {plan['model_kwargs']}: "
                             f"{exc}") from None
    for fqn, spec in plan["layers"].items():
        try:
            old = model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(f"saved layer {fqn} does not exist in {plan['architecture']}: mismatched model") from None
        if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != (spec["in_features"],
                                                                                         spec["out_features"]):
            raise ValueError(f"saved layer {fqn} ({spec['in_features']}->{spec['out_features']}) does not match "
                             f"{old} in {plan['architecture']}: mismatched model")
        try:
            set_submodule(model, fqn, FactorizedLinear.from_spec(spec))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{origin} is malformed: layer {fqn}: {exc}") from None
    for fqn, spec in plan.get("attention", {}).items():
        try:
            old = model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(f"saved attention {fqn} does not exist in {plan['architecture']}: mismatched model") \
                from None
        set_submodule(model, fqn, FactorizedAttention.from_spec_like(old, spec, fqn))  # validates, names problems
    for fqn in plan.get("mean_scan", []):  # VMeanba: these selective-scan mixers run the channel-mean scan
        try:
            module = model.get_submodule(fqn)
        except AttributeError:
            module = None
        if module is None or not is_scan(module):
            raise ValueError(f"saved mean-scan block {fqn} is not a selective scan in {plan['architecture']}: "
                             "mismatched model")
        module.mean_scan = True
    return model


def _rebuild_problems(model: nn.Module, plan: dict[str, Any]) -> list[str]:
    """What the model ``plan`` rebuilds lacks, adds or shapes otherwise than ``model``'s state dict, tensor by tensor
    (empty: every tensor by name and shape). Built on the meta device (no memory, no initialization), or on the CPU
    where a timm constructor needs real values (one that reads a tensor's value while building)."""
    try:
        with torch.device("meta"):
            skeleton = _rebuild(plan, origin="this model's plan")
    except Exception:
        skeleton = _rebuild(plan, origin="this model's plan")
    have = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    rebuilt = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    problems = [f"missing {name}" for name in have if name not in rebuilt]
    problems += [f"unexpected {name}" for name in rebuilt if name not in have]
    problems += [f"{name} {rebuilt[name]} instead of {shape}" for name, shape in have.items()
                 if name in rebuilt and rebuilt[name] != shape]
    return problems


def _not_rebuilt(plan: dict[str, Any], problems: list[str]) -> ValueError:
    return ValueError(f"timm.create_model({plan['architecture']!r}, **{plan['model_kwargs']}) does not rebuild this "
                      f"model ({len(problems)} difference(s): {', '.join(problems[:3])}), so it could not be loaded "
                      "again: pass model_name= and model_kwargs= that build it")


def _rebuilt_plan(model: nn.Module, plan: dict[str, Any], model_name: str | None,
                  model_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``plan`` with the architecture and arguments that :func:`load_compressed` will rebuild ``model`` from, or a
    ValueError saying why none will: a checkpoint that saves but does not load would lose the user's compressed
    model, so the rebuild is tried here, before anything is written. ``model_name`` and ``model_kwargs``, where the
    caller gives the arguments (the name too, or the model's), are the only candidate, and must rebuild every
    tensor by name and shape. Otherwise the adapter reads candidates from the model's modules
    (:meth:`~lowrank_vit.nn.adapters.TimmViTAdapter.model_specs`), which cannot know every option of every timm
    family, so the first that rebuilds every tensor must also compute what the model computes: an option that
    changes no shape (PVT-v2's heads per stage read as one count for all) would otherwise load as another model."""
    if model_kwargs is not None:
        candidates = [(plan["architecture"], model_kwargs)]
    else:
        candidates = [(model_name or spec.architecture, spec.kwargs) for spec in get_adapter(model).model_specs(model)]
    first_error = None
    for name, kwargs in candidates:
        trial = {**plan, "architecture": name, "model_kwargs": kwargs}
        try:
            problems = _rebuild_problems(model, trial)
        except ValueError as exc:  # timm refuses these arguments
            first_error = first_error or exc
            continue
        if problems:
            first_error = first_error or _not_rebuilt(trial, problems)
            continue
        if model_kwargs is not None:
            return trial
        difference = _output_difference(model, trial)
        if difference is None:
            return trial
        first_error = first_error or ValueError(
            f"timm.create_model({name!r}, **{kwargs}) rebuilds every tensor of this model but computes something "
            f"else ({difference}), so it could not be loaded again as it is: pass model_name= and model_kwargs= "
            "that build it")
    raise first_error


def _output_difference(model: nn.Module, plan: dict[str, Any]) -> str | None:
    """None where the model ``plan`` rebuilds, given ``model``'s tensors, computes what ``model`` computes (in eval
    mode, on one random input of the size the model was built for, to a relative 1e-5); else what differs. Costs one
    more copy of the model, on its device, and two forwards; the global random stream is left as it was (the copy's
    initialization draws on a forked one)."""
    reference = next(iter(model.parameters()), None)
    if reference is None:
        return "it has no parameter to compare on"
    in_chans, size = TimmViTAdapter().input_shape(model)
    declared = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
    shape = (1, in_chans or declared[0], *(size or declared[1:]))
    training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            rebuilt = _rebuild(plan, origin="this model's plan").to(reference.device, reference.dtype)
            rebuilt.load_state_dict(model.state_dict())
            images = torch.randn(shape).to(reference.device, reference.dtype)
            output = model.eval()(images)
            want, got = _tensors_of(output), _tensors_of(rebuilt.eval()(images))
    except Exception as exc:  # any failure to build, load or run it leaves the spec unproven: it is not kept
        return f"the rebuilt model does not run on a {'x'.join(map(str, shape))} input: {type(exc).__name__}: {exc}"
    finally:
        model.train(training)
    if not want:  # nothing to compare would prove nothing
        return f"its output ({type(output).__name__}) holds no tensor to compare"
    if [t.shape for t in want] != [t.shape for t in got]:
        return f"outputs of shapes {[tuple(t.shape) for t in got]} instead of {[tuple(t.shape) for t in want]}"
    for a, b in zip(want, got, strict=True):
        scale = float(a.abs().max()) if a.numel() else 0.0
        # the same kernels on the same values: equal but for the order of a reduction (a random-weight model's
        # outputs barely depend on its attention, so a looser bound let PVT-v2's one-head-for-all rebuild pass)
        if not torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-5 * scale + 1e-7):
            return f"outputs up to {float((a.float() - b.float()).abs().max()):.3g} apart on a random input"
    return None


def _tensors_of(output: Any) -> list[torch.Tensor]:
    """The tensors of a forward's output, in order: a tensor, or every tensor among its parts at any depth
    (:func:`~lowrank_vit.core.likelihood.output_parts`: a mapping's values, a tuple's items, an output object's
    attributes)."""
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for part in output_parts(output).values() for t in _tensors_of(part)]


def check_rebuildable(model: nn.Module, model_name: str | None = None,
                      model_kwargs: dict[str, Any] | None = None) -> None:
    """Raise a ValueError unless :func:`save_compressed` can write ``model`` so that :func:`load_compressed` rebuilds
    it (see :func:`_rebuilt_plan`). A dense model passes exactly when its compressed form will: compression swaps
    linears for factorized layers of the same widths. The CLI checks before compressing, so that a model it cannot
    save costs no calibration."""
    _rebuilt_plan(model, _plan(model, model_name, model_kwargs), model_name, model_kwargs)


def _plan(model: nn.Module, model_name: str | None, model_kwargs: dict[str, Any] | None,
          metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON plan of ``model``: how to rebuild the dense timm model (the arguments given, else the adapter's
    first candidate; :func:`_rebuilt_plan` settles which rebuilds it), and every factorized module's spec."""
    adapter = get_adapter(model)  # refuses a model without compressible layers
    spec = adapter.model_specs(model)[0] if model_name is None or model_kwargs is None else None
    plan = {"format": FORMAT, "version": FORMAT_VERSION, "architecture": model_name or spec.architecture,
            "model_kwargs": model_kwargs if model_kwargs is not None else spec.kwargs,
            "layers": {fqn: m.spec() for fqn, m in model.named_modules() if isinstance(m, FactorizedLinear)},
            "quantization": quantization_record(model), "metadata": metadata or {}}
    attention = {fqn: m.spec() for fqn, m in model.named_modules() if isinstance(m, FactorizedAttention)}
    if attention:  # COMCAT's factorized attention modules (older plans have no such key)
        plan["attention"] = attention
    mean_scan = [fqn for fqn, op in adapter.scan_modules(model).items() if op.mean_scan]
    if mean_scan:  # VMeanba's channel-mean scan blocks (older plans have no such key)
        plan["mean_scan"] = mean_scan
    return plan


def _stored_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``save_compressed`` writes: the state dict, quantized parameters as codes, scale and zero point."""
    record = quantization_record(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name in record:
            q = quantize_tensor(tensor, record[name]["bits"], record[name]["axis"])
            tensors.update({f"{name}:codes": q.codes, f"{name}:scale": q.scale, f"{name}:zero_point": q.zero_point})
        else:
            tensors[name] = tensor.detach()
    return tensors


def stored_bytes(model: nn.Module) -> int:
    """The bytes of the tensors ``save_compressed`` writes for this model (the file's payload, without its header):
    what a user's disk holds, unlike ``model_size_mib``'s Table 4 accounting (16-bit scales, 32-bit indices)."""
    return sum(t.numel() * t.element_size() for t in _stored_tensors(model).values())


def save_compressed(model: nn.Module, path: str | os.PathLike, *, model_name: str | None = None,
                    model_kwargs: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
                    push_to_hub: str | None = None, token: str | None = None, own_model: bool = False) -> Path:
    """Write ``model`` to the directory ``path`` (created if needed; its other files are left alone).

    Args:
        model: a timm model, usually compressed by :func:`lowrank_vit.compress`.
        path: output directory.
        model_name: timm architecture to rebuild from; default, read from the model's ``pretrained_cfg``.
        model_kwargs: ``timm.create_model`` arguments; default, read from the model's structure by the adapter.
        metadata: any JSON-serializable extra (e.g. the CompressionReport), stored in the plan.
        push_to_hub: also upload the directory to this Hugging Face hub repository (``owner/name``, created if
            needed; :func:`lowrank_vit.io.hub.push`), with ``token`` (default: ``HF_TOKEN`` or the saved login).
        own_model: the model is of one's own class (a wrapper around a timm backbone with a head of its own), which
            no timm name rebuilds: the plan records its class, and :func:`load_compressed` loads it into the dense
            model the caller builds (``model=``).
    """
    if own_model:
        model_name, model_kwargs = f"{OWN_MODEL}{type(model).__module__}.{type(model).__qualname__}", {}
    plan = _plan(model, model_name, model_kwargs, metadata)
    try:  # read_plan checks the specs too: a layer built by hand with rank 0 must not save, then fail to load
        _check_layer_specs(plan["layers"], "this model's plan")
    except ValueError as exc:
        raise ValueError(f"save_compressed: nothing was written: {exc}") from None
    try:
        if not own_model:
            plan = _rebuilt_plan(model, plan, model_name, model_kwargs)
    except ValueError as exc:
        remedy = "" if "model_kwargs=" in str(exc) else "; pass model_name= and model_kwargs= that build this model"
        raise ValueError(f"save_compressed: nothing was written: {exc}{remedy}") from None
    tensors = {k: v.contiguous().cpu() for k, v in _stored_tensors(model).items()}
    try:
        plan_text = json.dumps(plan, indent=2)  # before touching the directory: a bad metadata must not cost data
    except (TypeError, ValueError) as exc:
        raise TypeError(f"save_compressed: metadata is not JSON-serializable: {exc}") from None
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    atomic_write(out / PLAN_FILE, lambda tmp: tmp.write_text(plan_text))
    if push_to_hub is not None:
        push(out, push_to_hub, token=token)
    return out


def read_plan(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON plan of a saved model, validated; raises a ValueError that names the problem."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"no saved model at {directory}: not a directory")
    plan_file = directory / PLAN_FILE
    if not plan_file.is_file():
        raise FileNotFoundError(f"{directory} is not a lowrank_vit model directory: {PLAN_FILE} is missing")
    try:
        plan = json.loads(plan_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{plan_file} is corrupted: {exc}") from None
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise ValueError(f"{plan_file} is not a lowrank_vit plan (format field missing or wrong)")
    if plan.get("version") != FORMAT_VERSION:
        raise ValueError(f"{plan_file} has format version {plan.get('version')}, this library reads {FORMAT_VERSION}")
    for key, kind in (("architecture", str), ("model_kwargs", dict), ("layers", dict), ("quantization", dict)):
        if not isinstance(plan.get(key), kind):
            raise ValueError(f"{plan_file} is malformed: {key!r} is missing or not a {kind.__name__}")
    if not isinstance(plan.get("metadata", {}), dict):  # optional, but its readers (the CLI) expect a mapping
        raise ValueError(f"{plan_file} is malformed: 'metadata' is not a dict")
    _check_layer_specs(plan["layers"], str(plan_file))
    attention = plan.get("attention", {})
    if not isinstance(attention, dict) or not all(isinstance(spec, dict) for spec in attention.values()):
        raise ValueError(f"{plan_file} is malformed: 'attention' must map module names to specs")
    mean_scan = plan.get("mean_scan", [])
    if not isinstance(mean_scan, list) or not all(isinstance(name, str) for name in mean_scan):
        raise ValueError(f"{plan_file} is malformed: 'mean_scan' must be a list of module names")
    return plan


def plan_file_of(directory: Path) -> Path:
    return directory / PLAN_FILE


def load_compressed(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    cache_dir: str | os.PathLike | None = None, token: str | None = None,
                    model: nn.Module | None = None) -> nn.Module:
    """Rebuild the timm model saved by :func:`save_compressed`, with its factorized layers, in eval mode.

    ``path`` is a directory or a hub reference ``hf-hub:owner/name[@revision]``, fetched into the Hugging Face cache
    (``cache_dir``, default its own) with ``token`` by :func:`lowrank_vit.io.hub.download`. ``model``: the dense model
    to load into instead of the timm architecture the plan names (required for a model saved with ``own_model``;
    changed in place and returned); its state dict must match the file's, name by name and shape by shape.
    """

    directory = download(path, cache_dir=cache_dir, token=token) if is_hub_reference(path) else Path(path)
    plan = read_plan(directory)
    weights_file = directory / WEIGHTS_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"{directory} is incomplete: {WEIGHTS_FILE} is missing")
    # a device safetensors does not name the way torch does ("cpu:0", "meta") is read on the CPU and moved at the end;
    # a device torch does not know is the caller's mistake, said as such (not as a damaged file)
    device = torch.device(map_location)
    try:
        tensors = load_file(str(weights_file), device="cpu" if device.type in ("cpu", "meta") else str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{weights_file} is corrupted or not a safetensors file: {exc}") from None

    model = _rebuild(plan, origin=str(plan_file_of(directory)), dense=model)

    record = plan.get("quantization") or {}
    for name, info in record.items():
        try:
            q = QuantizedTensor(tensors.pop(f"{name}:codes"), tensors.pop(f"{name}:scale"),
                                tensors.pop(f"{name}:zero_point"), info["axis"])
        except KeyError:
            raise ValueError(f"{weights_file} lacks the quantized codes of {name}: corrupted or mismatched") from None
        tensors[name] = q.dequantize()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_file} does not match the plan's model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{weights_file}: {name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(expected[name].shape)}: mismatched model")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{weights_file}: {name} contains NaN or inf")
    model.load_state_dict(tensors, strict=True)
    if record:
        setattr(model, QUANT_ATTR, dict(record))
    return model.to(map_location).eval()
