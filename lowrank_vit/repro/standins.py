"""Smoke-scale stand-ins: tiny timm models of each family the paper compresses, pretrained once on MNIST-5k.

At ``full`` scale an experiment compresses a pretrained timm model on ImageNet. Neither exists offline, so at
``smoke`` scale the same experiment compresses a *stand-in*: a model of the same timm family (same class, same block
structure, same compressible linears), shrunk to 28x28 grayscale digits and pretrained here on the 4,000 training
digits of :class:`lowrank_vit.stages.data.MNIST5kDataModule`. The compression pipeline then meets the same code paths as
at full scale, and accuracy before and after compression means something, in minutes on a laptop CPU.

The family's relative sizes are kept (DeiT-T < DeiT-S < DeiT-B ~ ViT-B ~ Swin-B < ViT-L), and the block linears hold
almost all parameters, as in the real models, so that removing 40-77% of the *whole* model is feasible.

Pretraining runs once per stand-in and recipe: the weights go to ``standin_cache_dir()`` as safetensors (never
pickle) beside a small JSON record (spec, fingerprint, validation top-1, seconds). Several processes (DDP ranks) may
ask at once: a file lock lets one train while the others wait and then load. A stale (other recipe) or damaged entry
is retrained with a warning, never trusted.

The digits are preprocessed exactly as ``build_datamodule(DataConfig(name="mnist-5k"), model=standin)`` will feed
them later (the model family's pretrained-config mean and std, averaged to one channel, at 28x28), so the accuracy
measured here is the one the experiments start from.

Here, in order: the recipes (for each architecture of the experiment registry, which timm family, how it is shrunk
to 28x28 grayscale digits, and how it is pretrained: :class:`StandinSpec`, :data:`STANDINS`; every field enters the
fingerprint that keys the cached weights), the cache's location, the digits, pretraining and the cache itself. The
training loop is in :mod:`lowrank_vit.repro.tensortrain`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank_vit.core.files import atomic_write
from lowrank_vit.nn.adapters import timm_with_our_models
from lowrank_vit.repro.tensortrain import evaluate_top1, random_shift, stack_dataset, train_classifier
from lowrank_vit.stages.data_config import DataConfig
from lowrank_vit.stages.data_transforms import resolve_preprocessing

STANDIN_DATASET = "mnist-5k"
"""The dataset every stand-in is pretrained on (:class:`lowrank_vit.stages.data.MNIST5kDataModule`)."""
TRAINER_VERSION = 1
"""Part of every fingerprint: bump it when the training loop changes, so that old caches are retrained."""


@dataclass(frozen=True)
class StandinSpec:
    """One stand-in: which timm family, how it is shrunk, and how it is pretrained on the digits.

    ``timm.create_model(timm_name, pretrained=False, **model_kwargs)`` builds it; every field enters the fingerprint,
    so changing the recipe invalidates the cached weights.
    """

    arch: str
    """Registry key (``"deit_s"``...); also the cache entry's file name."""
    timm_name: str
    """The full-size model of the family (``"deit_small_patch16_224"``): its class and default config are reused."""
    model_kwargs: dict[str, Any] = field(hash=False)
    """Overrides of the full-size constructor: input 1x28x28, 10 classes, patch size, width, depth, heads..."""
    epochs: int
    lr: float
    """Peak learning rate of AdamW (linear warmup, cosine decay to zero)."""
    batch_size: int
    seed: int
    """Seeds the initialization, the batch order and the augmentation."""
    weight_decay: float = 0.05
    """AdamW weight decay of matrices (norms, biases, tokens and position embeddings are not decayed)."""
    warmup_fraction: float = 0.1
    """Fraction of the steps spent warming the learning rate up linearly."""
    label_smoothing: float = 0.1
    max_shift: int = 1
    """Random translation of every training digit by up to this many pixels (0: no augmentation). Measured on the
    DeiT-S stand-in, 20 epochs: 0 pixels 94.0% (it overfits: 100% on the training digits), 1 pixel 97.0%, 2 pixels
    94.4% (it underfits in so few epochs)."""

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {self.warmup_fraction!r}")
        if isinstance(self.max_shift, bool) or not isinstance(self.max_shift, int) or self.max_shift < 0:
            raise ValueError(f"max_shift must be a non-negative integer, got {self.max_shift!r}")

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def fingerprint(self) -> str:
        """Short hash of every field and of :data:`TRAINER_VERSION`: the cache key of the pretrained weights."""
        payload = json.dumps({"spec": self.to_dict(), "trainer": TRAINER_VERSION, "data": STANDIN_DATASET},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def create_model(self) -> nn.Module:
        """The randomly initialized stand-in (timm seeds nothing: seed torch first for a reproducible init)."""

        timm = timm_with_our_models()

        return timm.create_model(self.timm_name, pretrained=False, **self.model_kwargs)


_DIGITS = {"img_size": 28, "in_chans": 1, "num_classes": 10}


def _vit(embed_dim: int, depth: int, heads: int) -> dict[str, Any]:
    """A ViT/DeiT on 7x7 patches (16 tokens: cheap) with average pooling instead of a class token: on 4,000 digits
    it learns much faster (measured: 89% against 81% after 10 epochs; 4x4 patches, 49 tokens, reached only 72%)."""
    return {**_DIGITS, "patch_size": 7, "embed_dim": embed_dim, "depth": depth, "num_heads": heads, "mlp_ratio": 4.0,
            "global_pool": "avg", "class_token": False}


def _swin(embed_dim: int, depths: tuple[int, ...], heads: tuple[int, ...]) -> dict[str, Any]:
    """A Swin on 4x4 patches (the real model's patch4_window7; a 7x7 grid, then 4x4 after the patch merging) without
    timm's default stochastic depth of 0.1, which kept this small model underfitting."""
    return {**_DIGITS, "patch_size": 4, "window_size": 7, "embed_dim": embed_dim, "depths": depths,
            "num_heads": heads, "mlp_ratio": 4.0, "drop_path_rate": 0.0}


def _vmamba(embed_dim: int, depths: tuple[int, ...]) -> dict[str, Any]:
    """A VMamba on 4x4 patches (the real model's patch size): 7x7, 4x4, 2x2 and 1x1 grids through its four stages,
    with the real model's block counts, so that K switched blocks mean the same fraction at both scales."""
    return {**_DIGITS, "patch_size": 4, "embed_dim": embed_dim, "depths": depths}


STANDINS: dict[str, StandinSpec] = {
    spec.arch: spec
    for spec in (
        StandinSpec("deit_t", "deit_tiny_patch16_224", _vit(48, 4, 3), epochs=20, lr=2e-3, batch_size=32, seed=0),
        StandinSpec("deit_s", "deit_small_patch16_224", _vit(64, 4, 2), epochs=15, lr=2e-3, batch_size=32, seed=0),
        StandinSpec("deit_b", "deit_base_patch16_224", _vit(96, 4, 3), epochs=15, lr=2e-3, batch_size=32, seed=0),
        StandinSpec("vit_b", "vit_base_patch16_224", _vit(96, 4, 3), epochs=15, lr=2e-3, batch_size=32, seed=0),
        StandinSpec("vit_l", "vit_large_patch16_224", _vit(128, 6, 4), epochs=12, lr=1.5e-3, batch_size=32, seed=0),
        StandinSpec("swin_b", "swin_base_patch4_window7_224", _swin(60, (2, 2), (2, 4)), epochs=16, lr=2e-3,
                    batch_size=32, seed=0),
        StandinSpec("vmamba_t", "vmamba_tiny", _vmamba(16, (2, 2, 8, 2)), epochs=12, lr=2e-3, batch_size=32, seed=0),
        StandinSpec("vmamba_s", "vmamba_small", _vmamba(16, (2, 2, 20, 2)), epochs=12, lr=2e-3, batch_size=32,
                    seed=0),
        StandinSpec("vmamba_b", "vmamba_base", _vmamba(24, (2, 2, 20, 2)), epochs=12, lr=2e-3, batch_size=32,
                    seed=0),
    )
}
"""The stand-in of every architecture of the experiment registry."""


def resolve_spec(arch: str | StandinSpec) -> StandinSpec:
    """The spec of ``arch`` (a spec passes through, so tests and users can pretrain a recipe of their own).

    Raises:
        ValueError: ``arch`` is not a known stand-in; the message lists them and suggests the closest.
    """
    if isinstance(arch, StandinSpec):
        return arch
    if isinstance(arch, str) and arch in STANDINS:
        return STANDINS[arch]
    close = difflib.get_close_matches(str(arch), list(STANDINS), n=1, cutoff=0.4)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown stand-in architecture {arch!r}{hint} Known: {', '.join(STANDINS)}")


CACHE_ENV = "LOWRANK_VIT_CACHE"
"""Environment variable naming the cache root (``standins/`` is created under it)."""
FORMAT = "lowrank_vit.standin/1"
"""Tag of the JSON record beside the weights."""
COMMITTED_STANDINS = Path("experiments") / "models" / "standins"
"""Stand-in weights kept with the project (relative to a checkout's root, where `make demo` runs): the demo starts
from them, so that its table is the same on any machine (a stand-in trained on another CPU has other weights)."""


def standin_cache_dir() -> Path:
    """Where pretrained stand-ins live: ``$LOWRANK_VIT_CACHE/standins``, else ``$XDG_CACHE_HOME/lowrank_vit/standins``,
    else ``~/.cache/lowrank_vit/standins``. Not created here."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "standins"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lowrank_vit" / "standins"


# ----------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Digits:
    """The MNIST-5k splits decoded once into normalized tensors, as the project's data module would feed them."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    background: float
    """The normalized value of a black pixel: what a shifted digit is padded with."""
    preprocessing: dict[str, Any]
    """``resolve_preprocessing(model)``: input size, mean and std (recorded with the weights)."""


def load_digits(model: nn.Module) -> Digits:
    """Training and validation digits through ``build_datamodule(DataConfig(name="mnist-5k"), model=model)``'s
    evaluation transform: the same split, size, channels, mean and std that every later stage will use. The training
    augmentation (random shifts) is applied per batch in the training loop instead, which is much faster."""
    from lowrank_vit.stages.data import build_datamodule

    dm = build_datamodule(DataConfig(name=STANDIN_DATASET, augment=False), model=model)
    dm.setup()
    x_train, y_train = stack_dataset(dm.train_dataset)
    x_val, y_val = stack_dataset(dm.val_dataset)
    pre = dm.preprocessing
    background = (0.0 - float(pre["mean"][0])) / float(pre["std"][0])
    return Digits(x_train, y_train, x_val, y_val, background, _preprocessing_record(pre))


def _preprocessing_record(pre: dict[str, Any]) -> dict[str, Any]:
    return {"input_size": [int(v) for v in pre["input_size"]], "mean": [float(v) for v in pre["mean"]],
            "std": [float(v) for v in pre["std"]]}


# ----------------------------------------------------------------------------------------------------- training


def _train_on_digits(model: nn.Module, spec: StandinSpec, digits: Digits, progress: bool) -> dict[str, float]:
    """The stand-in recipe of :func:`train_classifier`, with random shifts padded with the digits' background."""
    return train_classifier(
        model, digits.x_train, digits.y_train, epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
        seed=spec.seed, weight_decay=spec.weight_decay, warmup_fraction=spec.warmup_fraction,
        label_smoothing=spec.label_smoothing, desc=f"pretraining {spec.arch} stand-in", progress=progress,
        augment=lambda x, generator: random_shift(x, spec.max_shift, digits.background, generator))


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return None


TRAINING_THREADS = 1
"""Intra-op threads of pretraining, whatever the machine. The weights must not depend on the load: with two threads
the matrix products reduce in another order, and thousands of steps amplify the rounding (measured on the DeiT-S
stand-in: the weights differed by up to 0.23 after 15 epochs). One thread also costs little on these small models
(measured on an idle 2-core machine: 39 s against 53 s with two threads; at best two were 1.3x faster)."""


@contextlib.contextmanager
def _num_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pretrain(spec: StandinSpec, progress: bool) -> tuple[nn.Module, dict[str, Any]]:
    """Build, train and evaluate one stand-in without touching the caller's random state or thread setting."""
    start, cpu_start = time.perf_counter(), time.process_time()
    load = _load_average()
    threads = TRAINING_THREADS
    with torch.random.fork_rng(devices=[]), _num_threads(threads):
        torch.manual_seed(spec.seed)
        model = spec.create_model()
        digits = load_digits(model)
        history = _train_on_digits(model, spec, digits, progress)
        top1 = evaluate_top1(model, digits.x_val, digits.y_val)
    info = {
        "format": FORMAT,
        "arch": spec.arch,
        "fingerprint": spec.fingerprint(),
        "spec": spec.to_dict(),
        "top1": top1,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "threads": threads,
        "load_average": load,
        "params": sum(p.numel() for p in model.parameters()),
        "preprocessing": digits.preprocessing,
        "dataset": STANDIN_DATASET,
        "versions": _versions(),
        **history,
    }
    return model.eval(), info


def _versions() -> dict[str, str]:
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__}


# ----------------------------------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class _Entry:
    weights: Path
    record: Path
    lock: Path


def _entry(cache_dir: Path, arch: str) -> _Entry:
    return _Entry(cache_dir / f"{arch}.safetensors", cache_dir / f"{arch}.json", cache_dir / f"{arch}.lock")


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (other processes block until it is released; where ``fcntl``
    does not exist, no lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _save(entry: _Entry, model: nn.Module, info: dict[str, Any]) -> None:
    """Weights first, then the record: the record is what makes an entry valid, and both carry the fingerprint."""

    entry.weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(entry.weights, lambda p: save_file(state, str(p), metadata={"fingerprint": info["fingerprint"]}))
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    atomic_write(entry.record, lambda p: p.write_text(text))


def _load(entry: _Entry, spec: StandinSpec) -> tuple[nn.Module, dict[str, Any]]:
    """The cached stand-in, or an exception saying why the entry cannot be used."""

    info = json.loads(entry.record.read_text())
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{entry.record} is not a stand-in record")
    expected = spec.fingerprint()
    if info.get("fingerprint") != expected:
        raise ValueError(f"it was trained with another recipe (fingerprint {info.get('fingerprint')}, "
                         f"expected {expected})")
    with safe_open(str(entry.weights), framework="pt") as handle:
        stored = (handle.metadata() or {}).get("fingerprint")
    if stored != expected:
        raise ValueError(f"{entry.weights.name} belongs to another recipe (fingerprint {stored})")
    state = load_file(str(entry.weights))
    model = spec.create_model()
    model.load_state_dict(state, strict=True)
    now = _preprocessing_record(resolve_preprocessing(model))
    if info.get("preprocessing") != now:
        raise ValueError(f"it was trained on digits preprocessed as {info.get('preprocessing')}, but this timm "
                         f"version preprocesses them as {now}")
    return model.eval(), info


def _try_load(entry: _Entry, spec: StandinSpec, warn: bool) -> tuple[nn.Module, dict[str, Any]] | None:
    if not entry.record.exists() and not entry.weights.exists():
        return None
    try:
        return _load(entry, spec)
    except Exception as err:  # a damaged, stale or foreign entry is retrained, never a crash
        if warn:
            warnings.warn(f"ignoring the cached {spec.arch} stand-in in {entry.record.parent} "
                          f"({type(err).__name__}: {err}); pretraining it again", stacklevel=3)
        return None


def _pretrain_and_cache(spec: StandinSpec, entry: _Entry, progress: bool) -> tuple[nn.Module, dict[str, Any]]:
    """Train (the caller holds the lock), cache, say where."""
    model, info = _pretrain(spec, progress)
    _save(entry, model, info)
    if progress:
        print(f"lowrank_vit: {spec.arch} stand-in ({spec.timm_name} family, {info['params']:,} parameters) pretrained "
              f"on {STANDIN_DATASET} in {info['seconds']:.0f} s, validation top-1 {info['top1']:.1f}%; cached in "
              f"{entry.weights}", file=sys.stderr)
    return model, info


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else standin_cache_dir()


def pretrain_standin(
    arch: str | StandinSpec, *, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """Pretrain ``arch``'s stand-in now (whatever is cached) and cache it.

    Returns:
        The model in eval mode and its record: ``top1`` (validation, percent), ``seconds``, ``params``,
        ``fingerprint``, ``spec``, ``preprocessing``...
    """
    spec = resolve_spec(arch)
    entry = _entry(_cache_root(cache_dir), spec.arch)
    with _exclusive(entry.lock):
        return _pretrain_and_cache(spec, entry, progress)


def build_standin(
    arch: str | StandinSpec,
    *,
    pretrained: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> nn.Module:
    """The stand-in of ``arch`` (a key of :data:`STANDINS`), in eval mode.

    Args:
        arch: ``"deit_t"``, ``"deit_s"``, ``"deit_b"``, ``"vit_b"``, ``"vit_l"`` or ``"swin_b"`` (or a spec).
        pretrained: Load the cached weights, pretraining and caching them first if they are missing, stale or
            damaged (one process trains, concurrent callers wait for it). False: a random initialization (seeded by
            the spec, so it is reproducible), nothing read or written.
        cache_dir: Directory of the cached weights; default :func:`standin_cache_dir`.
        progress: Show the pretraining progress bar and say where the weights went.

    Raises:
        ValueError: Unknown architecture.
    """
    spec = resolve_spec(arch)
    if not pretrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            return spec.create_model().eval()
    entry = _entry(_cache_root(cache_dir), spec.arch)
    loaded = _try_load(entry, spec, warn=False)  # the common case: no lock needed to read a finished entry
    if loaded is None:
        with _exclusive(entry.lock):
            loaded = _try_load(entry, spec, warn=True)  # another process may have finished it while we waited
            if loaded is None:
                loaded = _pretrain_and_cache(spec, entry, progress)
    return loaded[0]


def load_standin(arch: str | StandinSpec, directory: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """A stand-in stored in ``directory`` (``ARCH.safetensors`` beside ``ARCH.json``, as :func:`pretrain_standin`
    writes them), read only: nothing is trained, written or locked. For weights kept with a study, so that its cells
    reproduce on any machine (a stand-in retrained on another CPU has other weights).

    Returns:
        The model in eval mode and its record.

    Raises:
        FileNotFoundError: the weights or the record are missing.
        ValueError: unknown architecture, or the entry is damaged or belongs to another recipe (the message says
            which).
    """
    spec = resolve_spec(arch)
    entry = _entry(Path(directory).expanduser(), spec.arch)
    for path in (entry.weights, entry.record):
        if not path.is_file():
            raise FileNotFoundError(f"no {spec.arch} stand-in in {entry.weights.parent}: {path.name} is missing")
    try:
        return _load(entry, spec)
    except (OSError, ValueError) as err:
        raise ValueError(f"the {spec.arch} stand-in in {entry.weights.parent} cannot be used: {err}") from err
    except Exception as err:  # safetensors raises its own error types on a damaged file
        raise ValueError(f"the {spec.arch} stand-in in {entry.weights.parent} is damaged "
                         f"({type(err).__name__}: {err})") from err


def install_standin(arch: str | StandinSpec, directory: str | os.PathLike[str], *,
                    cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """Put the stand-in stored in ``directory`` (weights kept with the project, e.g. ``experiments/models/standins``)
    into the cache, so that every later :func:`build_standin` uses those very weights instead of training its own: a
    stand-in retrained on another CPU has other weights, and tables computed from it differ.

    Returns:
        True when the cache changed (it lacked the entry or held other weights of the same recipe), False when it
        already held these bytes.

    Raises:
        FileNotFoundError / ValueError: as :func:`load_standin` (missing, damaged, or another recipe's entry).
    """

    spec = resolve_spec(arch)
    load_standin(spec, directory)  # validated before anything is copied
    source = _entry(Path(directory).expanduser(), spec.arch)
    entry = _entry(_cache_root(cache_dir), spec.arch)
    with _exclusive(entry.lock):
        if entry.weights.is_file() and entry.record.is_file() and \
                entry.weights.read_bytes() == source.weights.read_bytes() and \
                entry.record.read_bytes() == source.record.read_bytes():
            return False
        for src, dst in ((source.weights, entry.weights), (source.record, entry.record)):  # the record last
            atomic_write(dst, lambda tmp, src=src: shutil.copyfile(src, tmp))
    return True


def standin_record(
    arch: str | StandinSpec, *, cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any] | None:
    """The cached record of ``arch`` (validation top-1, seconds, spec...) if its weights are cached for the current
    recipe, else None. Reads the JSON only."""
    spec = resolve_spec(arch)
    entry = _entry(_cache_root(cache_dir), spec.arch)
    try:
        info = json.loads(entry.record.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("fingerprint") != spec.fingerprint() or not entry.weights.exists():
        return None
    return info


__all__ = [
    "CACHE_ENV",
    "COMMITTED_STANDINS",
    "STANDINS",
    "STANDIN_DATASET",
    "Digits",
    "StandinSpec",
    "build_standin",
    "evaluate_top1",
    "install_standin",
    "load_digits",
    "load_standin",
    "pretrain_standin",
    "random_shift",
    "resolve_spec",
    "stack_dataset",
    "standin_cache_dir",
    "standin_record",
    "train_classifier",
]
