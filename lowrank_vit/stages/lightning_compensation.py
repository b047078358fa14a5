"""Layer-wise error compensation (Section 3.3) as a Lightning stage: every compressed layer's Z in one module.

Eq. (10) is one independent least-squares problem per layer l:
    min_Z  1/|D| sum_i ||X_l^i Z_l - X_l^i (W_l - U_l V_l^T)||_F^2 / ||X_l^i W_l||_F^2

so :class:`LayerwiseCompensation` keeps one optimizer (Adam, lr 1e-3, Section 4.1) per layer, steps each layer on
its own loss (logged as ``loss/<layer>``) and lets no layer's update depend on another's. The per-layer step, the
optimizer and the mini-batch indices are the functions of :mod:`lowrank_vit.methods.compensate` that ``fit_sgd``
(the loop ``compress(..., solver="sgd")`` runs) uses too: one implementation of the paper's solver, two drivers.
With the same seed both give the same Z.

Multi-process: under DDP (``Trainer(strategy="ddp", devices=N, num_nodes=M)``) layer i is trained by rank
``i % world_size`` only; its gradients are never all-reduced (the backward passes run inside DDP's ``no_sync``), and
at the end of training every layer's Z is broadcast from its owner, so all ranks hold the full result. Because every
rank draws every layer's mini-batch indices from the same seeded sampler, the result does not depend on the number
of processes.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lowrank_vit.core.progress import lightning_progress_callbacks
from lowrank_vit.methods.compensate import LayerIndexSampler, SGDTask, layer_optimizer, sgd_layer_step

MiniBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""One layer's mini-batch: (inputs X_i (B, s, k), targets X_i R (B, s, m), weights 1/||X_i W||^2 (B,))."""


class LayerSampleDataset(IterableDataset):
    """The stored per-layer calibration samples (the :class:`SGDTask` tensors), served as one mini-batch per layer
    per step: item t is ``{layer name: (inputs, targets, weights)}`` for step t.

    Indices come from :class:`LayerIndexSampler` (seeded, drawn for every layer even when ``layers`` selects only
    some), so a layer's batches are the same whichever subset of layers a process trains. Every iteration restarts
    the sampler: iterating twice yields the same batches.
    """

    def __init__(self, tasks: dict[str, SGDTask], iterations: int, batch_size: int, seed: int = 0,
                 layers: Sequence[str] | None = None) -> None:
        """Args:
            tasks: layer name -> its stored samples (the ``z`` of each task is not used here).
            iterations: number of steps (items).
            batch_size: images per layer mini-batch (the paper: 64).
            seed: seed of the index sampler.
            layers: the layers whose batches are served (default: all).
        """
        super().__init__()
        unknown = sorted(set(layers or ()) - set(tasks))
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown[:3]}: not among the tasks")
        for name, task in tasks.items():
            n = task.inputs.shape[0]
            if n == 0 or task.targets.shape[0] != n or task.weights.shape[0] != n:
                raise ValueError(f"layer {name}: inputs, targets and weights must hold the same number (> 0) of "
                                 f"images, got {n}, {task.targets.shape[0]}, {task.weights.shape[0]}")
        self.tasks = tasks
        self.iterations = iterations
        self.batch_size = batch_size
        self.seed = seed
        self.layers = list(tasks) if layers is None else list(layers)

    def __len__(self) -> int:
        return self.iterations

    def __iter__(self) -> Iterator[dict[str, MiniBatch]]:
        sampler = LayerIndexSampler({name: t.inputs.shape[0] for name, t in self.tasks.items()}, self.batch_size,
                                    self.seed)
        for _ in range(self.iterations):
            indices = sampler()
            batch = {}
            for name in self.layers:
                task = self.tasks[name]
                idx = indices[name].to(task.inputs.device)
                batch[name] = (task.inputs[idx], task.targets[idx], task.weights[idx])
            yield batch


class LayerwiseCompensation(L.LightningModule):
    """Every compressed layer's Z, fitted to eq. (10) by mini-batch gradient descent, one optimizer per layer.

    Manual optimization: at each step every layer this rank owns computes its loss on its own mini-batch,
    back-propagates it and steps its own optimizer (:func:`lowrank_vit.methods.compensate.sgd_layer_step`). The Z
    modules are the tasks' own modules, updated in place. ``history`` holds every layer's loss at every step after
    training.

    Note: in manual optimization Lightning counts every optimizer step in ``trainer.global_step``, so it reads
    ``iterations x layers on this rank``; the number of batches (``iterations``) is what bounds the run.
    """

    def __init__(self, tasks: dict[str, SGDTask], *, lr: float = 1e-3, iterations: int = 2000, batch_size: int = 64,
                 seed: int = 0) -> None:
        """Args:
            tasks: layer name -> :class:`SGDTask` (Z initialized away from G = Y = 0, see ``init_z_for_sgd``).
            lr: learning rate of every layer's Adam (Section 4.1: 1e-3).
            iterations: steps (Section 4.1: 2000).
            batch_size: images per mini-batch (Section 4.1: 64).
            seed: seed of the mini-batch sampler.
        """
        super().__init__()
        if not tasks:
            raise ValueError("no layer to compensate: the task dict is empty")
        for name, value in (("iterations", iterations), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        for name, task in tasks.items():
            if not any(p.requires_grad for p in task.z.parameters()):
                raise ValueError(f"layer {name}: its Z has no trainable parameter")
        self.automatic_optimization = False
        self.tasks = tasks
        self.layer_names = list(tasks)
        self.zs = nn.ModuleList([task.z for task in tasks.values()])
        self.lr, self.iterations, self.batch_size, self.seed = lr, iterations, batch_size, seed
        self.save_hyperparameters({"lr": lr, "iterations": iterations, "batch_size": batch_size, "seed": seed,
                                   "layers": {name: task.z.spec() if hasattr(task.z, "spec") else type(task.z).__name__
                                              for name, task in tasks.items()}})
        self._losses: torch.Tensor | None = None
        self.history: dict[str, list[float]] = {}

    def owned_layers(self) -> list[int]:
        """Indices of the layers this rank trains: layer i goes to rank ``i % world_size``."""
        world, rank = self._world()
        return [i for i in range(len(self.layer_names)) if i % world == rank]

    def _world(self) -> tuple[int, int]:
        if self._trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        layers = [self.layer_names[i] for i in self.owned_layers()]
        dataset = LayerSampleDataset(self.tasks, self.iterations, self.batch_size, self.seed, layers=layers)
        return DataLoader(dataset, batch_size=None, num_workers=0)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        # Every rank builds every layer's optimizer (cheap: Adam's state is created at the first step), so the
        # optimizer list has the same length everywhere; a rank only ever steps the ones of its layers.
        return [layer_optimizer(z, self.lr) for z in self.zs]

    def on_train_start(self) -> None:
        self._losses = torch.zeros(self.iterations, len(self.layer_names), device=self.device)

    def training_step(self, batch: dict[str, MiniBatch], batch_idx: int) -> None:
        optimizers = self.optimizers()
        if not isinstance(optimizers, list):
            optimizers = [optimizers]
        losses = torch.zeros(len(self.layer_names), device=self.device)
        strategy = self.trainer.strategy
        # Under DDP the backward passes must not all-reduce: each layer's gradient belongs to its owner rank alone.
        no_sync = strategy.block_backward_sync() if hasattr(strategy, "block_backward_sync") else \
            contextlib.nullcontext()
        with no_sync:
            for i in self.owned_layers():
                inputs, targets, weights = batch[self.layer_names[i]]
                losses[i] = sgd_layer_step(self.zs[i], optimizers[i], inputs, targets, weights,
                                           backward=self.manual_backward)
        if self.trainer.world_size > 1:
            losses = strategy.reduce(losses, reduce_op="sum")  # each layer's loss lives on one rank, zeros elsewhere
        if not bool(torch.isfinite(losses).all()):
            bad = [self.layer_names[i] for i in torch.nonzero(~torch.isfinite(losses)).flatten().tolist()]
            raise FloatingPointError(f"the SGD solver diverged on layer(s) {', '.join(bad[:5])}")
        if self._losses is not None and batch_idx < self._losses.shape[0]:
            self._losses[batch_idx] = losses
        last = batch_idx + 1 == self.iterations
        if self.loggers and ((batch_idx + 1) % self.trainer.log_every_n_steps == 0 or last):
            # Straight to the loggers (rank-zero-only, like every Lightning logger): self.log's bookkeeping grows
            # with the number of logged keys and would dominate a step with 48 layers. Every rank holds every loss
            # after the reduction above.
            values = losses.tolist()
            metrics = {f"loss/{name}": values[i] for i, name in enumerate(self.layer_names)}
            metrics["loss/mean"] = sum(values) / len(values)
            for logger in self.loggers:
                logger.log_metrics(metrics, step=batch_idx)

    def on_train_end(self) -> None:
        world, _ = self._world()
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            for i, z in enumerate(self.zs):
                for tensor in list(z.parameters()) + list(z.buffers()):
                    torch.distributed.broadcast(tensor.data, src=i % world)
        if self._losses is not None:
            steps = self._losses[: self.trainer.fit_loop.epoch_loop.batch_progress.total.completed].cpu()
            self.history = {name: steps[:, i].tolist() for i, name in enumerate(self.layer_names)}


def _accelerator_of(tasks: dict[str, SGDTask]) -> tuple[str, Any]:
    device = next(iter(tasks.values())).weights.device
    if device.type == "cuda":
        return "gpu", [device.index if device.index is not None else torch.cuda.current_device()]
    if device.type == "mps":
        return "mps", 1
    return "cpu", 1


def fit_layerwise(tasks: dict[str, SGDTask], *, lr: float = 1e-3, iterations: int = 2000, batch_size: int = 64,
                  seed: int = 0, accelerator: str | None = None, devices: Any = None, num_nodes: int = 1,
                  strategy: Any = "auto", logger: Any = None, progress: bool = False,
                  **trainer_kwargs: Any) -> dict[str, list[float]]:
    """Fit every task's Z by the paper's solver under a Lightning Trainer; the Z modules are updated in place.

    Args:
        tasks: layer name -> :class:`SGDTask`.
        lr, iterations, batch_size: Section 4.1's 1e-3, 2000, 64 by default.
        seed: seed of the mini-batch sampler (the same seed as ``fit_sgd`` gives the same batches).
        accelerator, devices: default, where the tasks' tensors are (one device).
        num_nodes, strategy: passed to the Trainer; ``strategy="ddp"`` with several devices or nodes splits the
            layers across ranks (SLURM and torchrun launches work as Lightning documents them).
        logger: a Lightning logger (e.g. :func:`lowrank_vit.stages.logging_utils.make_logger`) or None.
        progress: show Lightning's progress bar.
        trainer_kwargs: any other ``lightning.Trainer`` argument.

    Returns:
        Each layer's loss at every step (every rank returns all layers).
    """
    devices_before = {name: next(task.z.parameters()).device for name, task in tasks.items()}
    if accelerator is None:
        accelerator, default_devices = _accelerator_of(tasks)
        devices = default_devices if devices is None else devices
    module = LayerwiseCompensation(tasks, lr=lr, iterations=iterations, batch_size=batch_size, seed=seed)
    options: dict[str, Any] = dict(accelerator=accelerator, devices=devices if devices is not None else "auto",
                                   num_nodes=num_nodes, strategy=strategy, max_epochs=1, max_steps=-1,
                                   logger=logger if logger is not None else False, enable_checkpointing=False,
                                   enable_model_summary=False, enable_progress_bar=progress,
                                   callbacks=lightning_progress_callbacks(progress),
                                   num_sanity_val_steps=0, log_every_n_steps=min(50, iterations))
    options.update(trainer_kwargs)
    trainer = L.Trainer(**options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
        trainer.fit(module)
    # Lightning moves the module to the CPU when it tears down; give every Z back to where it was.
    for name, task in tasks.items():
        task.z.to(devices_before[name])
    history = module.history
    if len(next(iter(history.values()), [])) != iterations or any(not math.isfinite(v[-1]) for v in history.values()):
        raise RuntimeError(f"layer-wise compensation stopped early: {len(next(iter(history.values()), []))} of "
                           f"{iterations} steps ran")
    return history
