"""Calibration: one forward pass over the proxy dataset, streaming per-layer statistics through forward hooks.

For layer l with dense weight W (k, m) and image i with input tokens X_i (t, k), eq. (5) weighs image i by
w_i = 1 / ||X_i W||_F^2. Everything the closed-form solvers need is the weighted Gram matrix
H = sum_i w_i X_i^T X_i (k, k), accumulated in float64, so memory does not grow with the number of images.
Optional extras: the mean input X_rep (eq. 7, the paper's literal recipe) and, for the SGD solver, a few randomly
chosen tokens of every image with their own weights (the mini-batches of eq. 10).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lowrank_vit.progress import progress_bar

# Images whose output energy is below this are treated as carrying no signal (weight 0), not as infinitely important.
_MIN_ENERGY = 1e-30


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer (all tensors on the calibration device)."""

    gram: torch.Tensor
    """H = sum_i w_i X_i^T X_i, float64, (k, k)."""
    num_images: int
    """Images that contributed (the N of eq. 10's 1/|D|)."""
    mean_input: torch.Tensor | None = None
    """X_rep = mean_i X_i, float64, (t, k); only when requested."""
    samples: torch.Tensor | None = None
    """(N, s, k) float32: s random tokens of each image, for the SGD solver; only when requested."""
    sample_weights: torch.Tensor | None = None
    """(N,) float32: 1 / ||X_i^s W||^2 of the sampled tokens."""


def images_from_batch(batch: object) -> torch.Tensor:
    """The image tensor of one batch: a tensor, an (images, labels) pair, or a dict with an image key."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("image", "images", "pixel_values", "img"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise TypeError(
        f"a calibration batch must be an image tensor, an (images, labels) tuple or a dict with an 'image' tensor, "
        f"got {type(batch).__name__}"
    )


def iter_calibration_images(batches: Iterable, num_images: int) -> Iterator[torch.Tensor]:
    """Yield image batches until ``num_images`` images were produced; validate each batch."""
    if isinstance(batches, torch.Tensor):  # a single tensor of images is one batch, not an iterable of images
        batches = [batches]
    produced = 0
    for index, batch in enumerate(batches):
        images = images_from_batch(batch)
        if images.ndim != 4:
            raise ValueError(f"calibration batch {index} has shape {tuple(images.shape)}; expected (B, C, H, W)")
        if not images.is_floating_point():
            raise ValueError(f"calibration batch {index} has dtype {images.dtype}; expected floating-point images")
        if not torch.isfinite(images).all():
            raise ValueError(f"calibration batch {index} contains NaN or inf values")
        images = images[: num_images - produced]
        if images.shape[0] == 0:
            continue
        produced += images.shape[0]
        yield images
        if produced >= num_images:
            return
    if produced == 0:
        raise ValueError("the calibration data is empty: no image was produced by the iterable")


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: Iterable,
    num_images: int,
    *,
    want_mean: bool = False,
    sample_tokens: int = 0,
    device: torch.device | None = None,
    progress: bool = True,
    seed: int = 0,
    gram_precision: str = "float64",
) -> dict[str, LayerStats]:
    """Run the model once over the calibration images and return each layer's statistics.

    Args:
        model: the dense model; put in eval mode for the pass and restored afterwards.
        layers: name -> ``nn.Linear`` whose inputs are recorded.
        batches: iterable of calibration batches.
        num_images: how many images to use.
        want_mean: also accumulate the mean input X_rep (for ``decomposition="mean"``).
        sample_tokens: keep this many random tokens of every image (for the SGD solver); 0 keeps none.
        device: where to run; default, where the model's parameters are.
        progress: show a progress bar.
        seed: seed of the token sampling.
        gram_precision: dtype name of each batch's X^T X product; the running sum is float64 regardless.
    """
    product_dtype = getattr(torch, gram_precision)
    device = device or next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, object] = {"batch": 0}
    grams = {name: torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64, device=device)
             for name, layer in layers.items()}
    mean_sums: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    sample_weights: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    counts = dict.fromkeys(layers, 0)

    def make_hook(name: str):
        def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            batch = int(state["batch"])
            x = inputs[0].detach().reshape(batch, -1, module.in_features)
            if not torch.isfinite(x).all():
                raise ValueError(f"non-finite activations (NaN or inf) reach layer {name} during calibration")
            y = output.detach()
            if module.bias is not None:
                y = y - module.bias
            y = y.reshape(batch, -1, module.out_features)
            energy = y.double().pow(2).sum(dim=(1, 2))
            weights = torch.where(energy > _MIN_ENERGY, 1.0 / energy.clamp_min(_MIN_ENERGY), torch.zeros_like(energy))
            xs = (x.to(product_dtype) * weights.sqrt().to(product_dtype)[:, None, None]).reshape(-1, module.in_features)
            grams[name] += (xs.T @ xs).double()
            counts[name] += batch
            if want_mean:
                total = x.double().sum(dim=0)
                if name in mean_sums and mean_sums[name].shape != total.shape:
                    raise ValueError(f"layer {name} saw a varying number of tokens per image; "
                                     "decomposition='mean' needs images of one size")
                mean_sums[name] = mean_sums[name] + total if name in mean_sums else total
            if sample_tokens:
                tokens = x.shape[1]
                take = min(sample_tokens, tokens)
                idx = torch.rand(batch, tokens, generator=generator).argsort(dim=1)[:, :take].to(x.device)
                xs_sub = torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[2])).float()
                ys_sub = torch.gather(y, 1, idx[:, :, None].expand(-1, -1, y.shape[2])).double()
                e_sub = ys_sub.pow(2).sum(dim=(1, 2))
                w_sub = torch.where(e_sub > _MIN_ENERGY, 1.0 / e_sub.clamp_min(_MIN_ENERGY), torch.zeros_like(e_sub))
                samples[name].append(xs_sub.cpu())
                sample_weights[name].append(w_sub.float().cpu())
        return hook

    was_training = model.training
    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        model.eval()
        with progress_bar(total=num_images, desc="calibration", unit="img", enabled=progress) as bar:
            for images in iter_calibration_images(batches, num_images):
                state["batch"] = images.shape[0]
                model(images.to(device))
                bar.update(images.shape[0])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    stats: dict[str, LayerStats] = {}
    for name in layers:
        n = counts[name]
        if n == 0:
            raise ValueError(f"layer {name} was never reached by the calibration forward pass")
        stats[name] = LayerStats(
            gram=grams[name],
            num_images=n,
            mean_input=mean_sums[name] / n if want_mean else None,
            samples=torch.cat(samples[name]) if sample_tokens else None,
            sample_weights=torch.cat(sample_weights[name]) if sample_tokens else None,
        )
    return stats
