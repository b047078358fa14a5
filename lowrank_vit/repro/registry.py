"""The experiment registry: one named, fully resolved job per row of the paper's tables (and per ablation).

Entries are registered by decorated functions, the way timm registers models: a function returning one
:class:`Experiment` (or several) is decorated with :func:`register_experiment`, and importing the module that holds
it registers the rows. The library never names the modules that hold rows: they declare themselves as entry points
of the group ``lowrank_vit.experiments`` (pyproject.toml; the repository's ``experiments/``, the paper's tables and
the ablations, installed as ``lowrank_vit_experiments``, is the one this project ships), loaded on first use of
:func:`get_experiment` / :func:`list_experiments`.

Every entry carries two complete :class:`RunConfig`: ``full`` (the paper: timm pretrained weights, ImageNet-1k,
1024 calibration images, 20-epoch partial fine-tune, GPUs) and ``smoke`` (the same method, ratio and architecture
family on a tiny stand-in of that family pretrained on the embedded MNIST digits, 256 calibration images and a
short fine-tune, on a CPU in minutes), plus the numbers the paper reports for the row.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import importlib.metadata
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lowrank_vit.config import CompressionConfig, setting_type
from lowrank_vit.methods.prune import PruningConfig
from lowrank_vit.methods.vmeanba import VMeanbaConfig
from lowrank_vit.stages.data_config import DataConfig
from lowrank_vit.stages.finetune_config import FinetuneConfig

SCALES = ("full", "smoke")
ACCELERATORS = ("cpu", "gpu", "auto")
MODEL_SOURCES = ("timm", "standin")
TABLE_ORDER = ("table1", "table2", "table3", "table4", "ablation", "compare", "vmeanba")
"""Listing order of the tables (others follow, in registration order)."""
ENTRY_POINT_GROUP = "lowrank_vit.experiments"
"""Entry-point group whose modules register experiments when imported (each imports its own submodules)."""
METHOD_LABELS = {"loss-aware": "loss-aware (default)", "ours": "paper's recipe (whitened SVD)",
                 "vanilla": "vanilla SVD + FT", "plain": "plain SVD", "mean": "mean-input SVD", "asvd": "ASVD",
                 "fwsvd": "FWSVD", "comcat": "COMCAT", "comcat-search": "COMCAT + its rank search",
                 "flar-svd": "FLAR-SVD", "svd-llm": "SVD-LLM",
                 "svd-llm-update": "SVD-LLM + update",
                 "svd-llm-v2": "SVD-LLM v2", "kfac-lems": "KFAC-SVD + LEMS", "vmeanba": "VMeanba",
                 "vmeanba+loss-aware": "VMeanba + loss-aware", "prune": "magnitude pruning",
                 "vmeanba+prune": "VMeanba + magnitude pruning"}
"""A row's method key -> the label every results table, demo table and figure prints ("vanilla" is Table 2's
vanilla SVD: plain SVD, uniform ranks, no Z, always fine-tuned)."""


class UnknownExperimentError(KeyError):
    """No experiment of that name; the message suggests the closest names."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**data)


@dataclass
class ModelConfig:
    """Which network a row starts from."""

    source: str
    """"timm": ``timm.create_model(name, pretrained=...)``; "standin": a tiny model of a family pretrained on the
    embedded MNIST digits (:mod:`lowrank_vit.repro.standins`), ``name`` being the family key ("deit_s", "swin_b",
    ...)."""
    name: str
    """timm model name or stand-in key."""
    pretrained: bool = True
    """Start from trained weights (timm's pretrained checkpoint, or the cached stand-in)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments (timm source only)."""
    checkpoint: str | None = None
    """A safetensors or ``torch.save`` file (read weights-only) of the model's own weights (a model you trained or
    fine-tuned), loaded strictly into ``timm.create_model(name, **kwargs)`` in place of timm's pretrained weights
    (timm source only)."""

    def __post_init__(self) -> None:
        if self.source not in MODEL_SOURCES:
            raise ValueError(f"model source {self.source!r} is not one of {', '.join(MODEL_SOURCES)}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("model name must be a non-empty string")
        if self.checkpoint is not None:
            if not isinstance(self.checkpoint, str) or not self.checkpoint:
                raise ValueError(f"model checkpoint must be a path to a weights file, got {self.checkpoint!r}")
            if self.source != "timm":
                raise ValueError(f"a model checkpoint needs model source 'timm', not {self.source!r}")


@dataclass
class QuantizationConfig:
    """Post-training quantization after fine-tuning (Section 4.3, eq. 16) and the bit width of the size count."""

    bits: int = 8
    """Bits of the quantized weights."""
    include_dense: bool = False
    """Also quantize the dense weight matrices (head, patch embedding, layers left dense), as Table 4's
    "baseline + 4-bit PTQ" must; otherwise only U, V and Z's factors."""

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"quantization bits must be an integer in [2, 16], got {self.bits!r}")


@dataclass
class HardwareConfig:
    """Where the row runs; the CLI's --accelerator/--devices/--num-nodes override it."""

    accelerator: str = "auto"
    devices: int = 1
    """Processes per node (GPUs, or CPU processes); more than one (or several nodes) means DDP."""
    num_nodes: int = 1

    def __post_init__(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"accelerator {self.accelerator!r} is not one of {', '.join(ACCELERATORS)}")
        _positive_int("devices", self.devices)
        _positive_int("num_nodes", self.num_nodes)

    @property
    def distributed(self) -> bool:
        return self.devices * self.num_nodes > 1


@dataclass
class RunOptions:
    """How a row is run, beyond its model, data and method; none of it changes the row's result."""

    skip_baseline_guard: bool = False
    """Compress a full-scale row even when the dense model's top-1 is under half the paper's baseline (see
    :func:`lowrank_vit.repro.rows.check_dense_baseline`): for weights or data that are meant to differ from the
    paper's."""

    def __post_init__(self) -> None:
        if not isinstance(self.skip_baseline_guard, bool):
            raise ValueError(f"run.skip_baseline_guard must be true or false, got {self.skip_baseline_guard!r}")


@dataclass
class RunConfig:
    """Everything one run of a row needs, at one scale."""

    scale: str
    model: ModelConfig
    data: DataConfig
    compression: CompressionConfig | None = None
    """None: the dense model (a baseline row)."""
    finetune: Any = None
    """:class:`lowrank_vit.stages.finetune.FinetuneConfig`, or None for no fine-tuning."""
    quantization: QuantizationConfig | None = None
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    size_bits: int = 16
    """Bit width at which unquantized parameters are counted in ``size_mib`` (the paper's FP16)."""
    run: RunOptions = field(default_factory=RunOptions)
    """Run-time switches (``--set run.skip_baseline_guard=true``)."""
    vmeanba: Any = None
    """:class:`lowrank_vit.methods.vmeanba.VMeanbaConfig` for vision state-space models: the channel-mean scan in the
    blocks of least impact, run on the dense model before any low-rank compression; None: no VMeanba step."""
    pruning: Any = None
    """:class:`lowrank_vit.methods.prune.PruningConfig`: unstructured magnitude pruning of the block linear weights,
    after VMeanba; None: no pruning. Neither a low-rank step nor a fine-tune may follow it (see ``__post_init__``)."""

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale {self.scale!r} is not one of {', '.join(SCALES)}")
        if self.size_bits not in (8, 16, 32):
            raise ValueError(f"size_bits must be 8, 16 or 32, got {self.size_bits!r}")
        if self.pruning is not None and self.compression is not None:
            # the low-rank step would replace the sparse weights by dense factors: the zeros would be lost
            raise ValueError("pruning and a low-rank compression of the same block layers do not combine: the "
                             "low-rank step replaces the pruned weights by dense factors; give one of them")
        if self.pruning is not None and self.finetune is not None:
            # the partial fine-tune needs factorized layers, and one that trains the block weights regrows the zeros
            raise ValueError("pruning takes no fine-tune here: the partial fine-tune runs on a low-rank compressed "
                             "model only, and one that trains the block weights (train_factors) would regrow the "
                             "pruned weights")

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "model": dataclasses.asdict(self.model),
            "data": self.data.to_dict(),
            "compression": None if self.compression is None else self.compression.to_dict(),
            "finetune": None if self.finetune is None else self.finetune.to_dict(),
            "quantization": None if self.quantization is None else dataclasses.asdict(self.quantization),
            "hardware": dataclasses.asdict(self.hardware),
            "size_bits": self.size_bits,
            "run": dataclasses.asdict(self.run),
            "vmeanba": None if self.vmeanba is None else dataclasses.asdict(self.vmeanba),
            "pruning": None if self.pruning is None else dataclasses.asdict(self.pruning),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RunConfig field(s): {', '.join(unknown)}")

        def optional(key: str, build: Callable[[dict[str, Any]], Any]) -> Any:
            return None if data.get(key) is None else build(data[key])

        return cls(scale=data["scale"], model=_from_dict(ModelConfig, data["model"]),
                   data=DataConfig.from_dict(data["data"]),
                   compression=optional("compression", CompressionConfig.from_dict),
                   finetune=optional("finetune", FinetuneConfig.from_dict),
                   quantization=optional("quantization", lambda d: _from_dict(QuantizationConfig, d)),
                   hardware=_from_dict(HardwareConfig, data.get("hardware", {})),
                   size_bits=data.get("size_bits", 16),
                   run=_from_dict(RunOptions, data.get("run") or {}),
                   vmeanba=optional("vmeanba", lambda d: _from_dict(VMeanbaConfig, d)),
                   pruning=optional("pruning", lambda d: _from_dict(PruningConfig, d)))

    def override(self, assignments: Iterable[str]) -> RunConfig:
        """A copy with ``section.field=value`` assignments applied (``finetune.epochs=1``, ``data.calib_samples=64``,
        ``model.pretrained=false``); values are JSON (bare words are strings). Assignments to a section the row
        does not have (``compression`` of a baseline) are skipped, so one set of overrides serves a whole table. The
        result is validated again.

        Raises:
            ValueError: malformed assignment, unknown field, or an invalid value.
        """
        data = self.to_dict()
        for text in assignments:
            key, sep, raw = text.partition("=")
            path = key.strip().split(".")
            if not sep or not all(path):
                raise ValueError(f"bad override {text!r}: expected section.field=value, e.g. finetune.epochs=1")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            node = data
            if len(path) > 1 and path[0] in data and data[path[0]] is None:
                continue  # a section this row does not have (a baseline's compression): nothing to change
            for part in path[:-1]:
                if not isinstance(node.get(part), dict):
                    raise ValueError(f"bad override {text!r}: {part!r} is not a section of this row's config "
                                     f"(sections: {', '.join(k for k, v in data.items() if isinstance(v, dict))})")
                node = node[part]
            if path[-1] not in node and not (path[:-1] == ["compression"] and setting_type(path[-1]) is not None):
                where = ".".join(path[:-1]) or "the config"
                raise ValueError(f"bad override {text!r}: no field {path[-1]!r} in {where}")
            node[path[-1]] = value
        return RunConfig.from_dict(data)

    def with_hardware(self, accelerator: str | None = None, devices: int | None = None,
                      num_nodes: int | None = None) -> RunConfig:
        """A copy with the given hardware fields replaced (None keeps the row's own)."""
        hw = self.hardware
        new = HardwareConfig(accelerator or hw.accelerator, devices if devices is not None else hw.devices,
                             num_nodes if num_nodes is not None else hw.num_nodes)
        return dataclasses.replace(self, hardware=new)


@dataclass(frozen=True)
class PaperResult:
    """What the paper reports for a row (None where it reports nothing)."""

    params_m: float | None = None
    """Parameters of the whole model, in millions."""
    top1: float | None = None
    """ImageNet-1k top-1, percent."""
    size_mib: float | None = None
    """Model size in MiB (Table 4)."""
    residual: float | None = None
    """Average residual error after compensation (Table 1)."""


@dataclass
class Experiment:
    """One registered row: its two runs and what the paper says about it."""

    name: str
    """``table2/deit_b/ours-50`` and the like."""
    table: str
    """"table1" ... "table4", "ablation", "compare"."""
    arch: str
    """Architecture key (deit_b, deit_s, deit_t, vit_b, vit_l, swin_b)."""
    method: str
    """"baseline", "ours", "vanilla", or an ablation's variant."""
    full: RunConfig
    smoke: RunConfig
    paper: PaperResult = PaperResult()
    reduction: float | None = None
    """Fraction of the parameters removed (None for baselines and absolute targets)."""
    description: str = ""
    notes: tuple[str, ...] = ()
    """Caveats shown beside the results, e.g. a paper count inconsistent with its own percentage."""
    arch_label: str = ""
    """How results tables print the architecture ("DeiT-S"); empty: the key itself."""

    def __post_init__(self) -> None:
        if self.name.count("/") != 2 or not all(self.name.split("/")):
            raise ValueError(f"experiment name {self.name!r} must read TABLE/ARCH/METHOD")
        if self.name.split("/")[0] != self.table:
            raise ValueError(f"experiment {self.name!r} is filed under table {self.table!r}")
        if self.full.scale != "full" or self.smoke.scale != "smoke":
            raise ValueError(f"experiment {self.name!r}: its full/smoke configs carry the wrong scale")

    def config(self, scale: str) -> RunConfig:
        if scale not in SCALES:
            raise ValueError(f"scale {scale!r} is not one of {', '.join(SCALES)}")
        return self.full if scale == "full" else self.smoke

    def to_dict(self, scale: str | None = None) -> dict[str, Any]:
        """The entry as JSON-ready data: both scales, or only ``scale``'s config."""
        out: dict[str, Any] = {"name": self.name, "table": self.table, "arch": self.arch, "method": self.method,
                               "reduction": self.reduction, "description": self.description,
                               "paper": dataclasses.asdict(self.paper), "notes": list(self.notes)}
        if scale is None:
            out["full"], out["smoke"] = self.full.to_dict(), self.smoke.to_dict()
        else:
            out["scale"] = scale
            out["config"] = self.config(scale).to_dict()
        return out


_REGISTRY: dict[str, Experiment] = {}
_LOADED = False


def register_experiment(fn: Callable[[], Experiment | Iterable[Experiment]]) -> Callable[[], Any]:
    """Decorator: call ``fn`` now and register the experiment(s) it returns. Names must be unique; the same experiment
    registered again (``experiments/`` imported under its folder's name in a checkout too) is accepted."""
    result = fn()
    experiments = [result] if isinstance(result, Experiment) else list(result)
    if not experiments:
        raise ValueError(f"{fn.__qualname__} registered no experiment")
    for exp in experiments:
        if not isinstance(exp, Experiment):
            raise TypeError(f"{fn.__qualname__} returned {type(exp).__name__}, not an Experiment")
        if exp.name in _REGISTRY:
            if _REGISTRY[exp.name] == exp:
                continue  # the same row again: experiments/ imported under its folder's name in a checkout as well
            raise ValueError(f"experiment {exp.name!r} is registered twice")
        _REGISTRY[exp.name] = exp
    return fn


def _ensure_loaded() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            entry_point.load()


def arch_label(arch: str) -> str:
    """The label of an architecture key in results tables, as its registered rows give it (the key itself when
    none does)."""
    _ensure_loaded()
    return next((e.arch_label for e in _REGISTRY.values() if e.arch == arch and e.arch_label), arch)


def method_label(method: str) -> str:
    """The label of a row's method key in results tables and figures (the key itself when it has none)."""
    return METHOD_LABELS.get(method, method)


def list_experiments(pattern: str | None = None) -> list[Experiment]:
    """Registered experiments in registration order, optionally filtered by a shell pattern
    (``table2/deit_s/*``) or a prefix (``table2``)."""
    _ensure_loaded()
    order = {table: i for i, table in enumerate(TABLE_ORDER)}
    exps = sorted(_REGISTRY.values(), key=lambda e: order.get(e.table, len(order)))  # stable: rows keep their order
    if pattern:
        exps = [e for e in exps if fnmatch.fnmatchcase(e.name, pattern) or e.name.startswith(pattern.rstrip("/") + "/")]
    return exps


def get_experiment(name: str) -> Experiment:
    """The experiment called ``name``.

    Raises:
        UnknownExperimentError: no such name; the message lists the closest ones.
    """
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; `lowrank-vit list` shows them all"
        if not _REGISTRY:  # an installation without the package metadata that declares the experiment modules
            hint = (f"; no experiment module is registered (entry-point group {ENTRY_POINT_GROUP!r}): install the "
                    f"package (pip install -e .) so that its metadata is present")
        raise UnknownExperimentError(f"unknown experiment {name!r}{hint}") from None


def tables() -> list[str]:
    """The table names that have rows, in registration order."""
    return list(dict.fromkeys(e.table for e in list_experiments()))


__all__ = [
    "METHOD_LABELS",
    "Experiment",
    "HardwareConfig",
    "ModelConfig",
    "PaperResult",
    "QuantizationConfig",
    "RunConfig",
    "RunOptions",
    "UnknownExperimentError",
    "arch_label",
    "get_experiment",
    "method_label",
    "list_experiments",
    "register_experiment",
    "tables",
]
