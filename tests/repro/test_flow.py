"""Tests of lowrank_vit/repro/flow.py."""

from __future__ import annotations

import time

import pytest
import torch

from tests.helpers import make_vssm, patch_everywhere, vssm_images


@pytest.mark.usefixtures("offline")
def test_the_compression_shows_progress_as_the_command_says_whatever_its_config_says(monkeypatch):
    """`run ROW --quiet` hands compress_model a row's config whose progress is on (the dataclass default): the
    command's word wins, and the other way round."""
    from lowrank_vit import CompressionConfig, pipeline
    from lowrank_vit.repro.flow import compress_model

    seen = []
    patch_everywhere(monkeypatch, pipeline, "compress", lambda model, images, config: seen.append(config.progress))
    for config_says, command_says in ((True, False), (False, True)):
        compress_model(torch.nn.Linear(2, 2), lambda: [], CompressionConfig(reduction=0.5, progress=config_says),
                       device=torch.device("cpu"), progress=command_says)
        assert seen[-1] is command_says


def _scans(monkeypatch, seconds: float = 0.0):
    from lowrank_vit.methods import vmeanba as method

    seen = {}

    class Report:
        def to_dict(self):
            return {"chosen": []}

    def scans(model, batches, cfg, calib_samples):
        seen["calib_samples"], seen["cfg"] = calib_samples, cfg
        time.sleep(seconds)
        return Report()

    patch_everywhere(monkeypatch, method, "apply_vmeanba", scans)
    return method.VMeanbaConfig, seen


@pytest.mark.usefixtures("offline")
def test_vmeanbas_step_is_announced_and_reads_no_more_images_than_there_are(monkeypatch):
    """The announcement names the scans' count, or the speedup they are chosen for; the scans are told to read
    the images the data holds when it holds fewer than asked (their report counts what they had)."""
    from lowrank_vit.repro.flow import compress_model

    config, seen = _scans(monkeypatch)
    said = []
    cpu = torch.device("cpu")
    compress_model(torch.nn.Identity(), lambda: [], None, config(num_blocks=2, calib_samples=8), device=cpu,
                   progress=False, available=3, say=said.append)
    assert said == ["VMeanba, the channel-mean scan in 2 block(s)"] and seen["calib_samples"] == 3
    compress_model(torch.nn.Identity(), lambda: [], None, config(target_speedup=1.5, calib_samples=8), device=cpu,
                   progress=False, say=said.append)
    assert said[-1] == "VMeanba, the channel-mean scan in the blocks that reach 1.5x" and seen["calib_samples"] == 8


@pytest.mark.usefixtures("offline")
def test_compress_model_moves_the_model_to_the_device_and_keeps_no_copy_unless_asked(monkeypatch):
    """The model goes to the device the command chose (recorded here, as this machine has one device); a copy of
    it before the low-rank step (a whole second model in memory) is kept only when asked for."""
    from lowrank_vit import CompressionConfig, pipeline
    from lowrank_vit.repro.flow import compress_model

    moved = []

    class Model(torch.nn.Linear):
        def to(self, *args, **kwargs):
            moved.append(args)
            return super().to(*args, **kwargs)

    patch_everywhere(monkeypatch, pipeline, "compress", lambda model, images, config: "report")
    cpu = torch.device("cpu")
    done = compress_model(Model(2, 2), lambda: [], CompressionConfig(reduction=0.5), device=cpu, progress=False)
    assert moved == [(cpu,)] and done.report == "report" and done.before_lowrank is None
    done = compress_model(Model(2, 2), lambda: [], CompressionConfig(reduction=0.5), device=cpu, progress=False,
                          keep_before_lowrank=True)
    assert isinstance(done.before_lowrank, Model)


@pytest.mark.usefixtures("offline")
def test_compress_models_low_rank_step_is_announced_timed_and_told_the_device(monkeypatch):
    """The step's announcement names the recipe; the compression runs on the command's device with its progress
    setting; its wall time is recorded to the millisecond; the copy kept from before it is a copy (the step works in
    place, and a shallow copy would change with it)."""
    from lowrank_vit import CompressionConfig, pipeline
    from lowrank_vit.repro.flow import compress_model

    seen = []

    def compress(model, images, config):
        seen.append(config)
        time.sleep(0.02)
        with torch.no_grad():
            model.weight.zero_()  # in place, as the real step
        return "report"

    patch_everywhere(monkeypatch, pipeline, "compress", compress)
    model, said = torch.nn.Linear(2, 2), []
    config = CompressionConfig(reduction=0.5, decomposition="whitened", allocation="greedy", compensation="none",
                               progress=True)
    done = compress_model(model, lambda: [], config, device=torch.device("cpu"), progress=False,
                          keep_before_lowrank=True, say=said.append)
    assert said == ["compressing (whitened SVD, greedy ranks, Z none)"]
    assert (seen[0].device, seen[0].progress) == ("cpu", False)
    assert 0.015 <= done.seconds["compress"] < 1.0 and done.seconds["compress"] == round(done.seconds["compress"], 3)
    assert torch.count_nonzero(model.weight) == 0 and torch.count_nonzero(done.before_lowrank.weight) == 4


@pytest.mark.usefixtures("offline")
def test_vmeanbas_step_is_timed_to_the_millisecond(monkeypatch):
    """compress_model times VMeanba's scans (the report's timings_s): a step of about 20 ms is not rounded to 0."""
    from lowrank_vit.repro.flow import compress_model

    config, _ = _scans(monkeypatch, seconds=0.02)
    done = compress_model(torch.nn.Identity(), lambda: [], None, config(num_blocks=1), device=torch.device("cpu"),
                          progress=False)
    assert 0.015 <= done.seconds["vmeanba"] < 1.0
    assert done.seconds["vmeanba"] == round(done.seconds["vmeanba"], 3)


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("progress", [False, True])
def test_vmeanbas_scans_show_progress_as_the_command_says(progress, monkeypatch):
    from lowrank_vit.repro.flow import compress_model

    config, seen = _scans(monkeypatch)
    compress_model(torch.nn.Identity(), lambda: [], None, config(num_blocks=1, progress=not progress),
                   device=torch.device("cpu"), progress=progress)
    assert seen["cfg"].progress is progress


@pytest.mark.usefixtures("offline")
def test_pruning_runs_after_vmeanba_on_the_switched_model_and_is_reported(monkeypatch):
    """The order VMeanba's paper combines them in: the scans are chosen on the dense model, then the weights are
    pruned; both reports and both wall times come back, and each step is announced."""
    from lowrank_vit.methods import prune as method
    from lowrank_vit.methods.prune import PruningConfig, measure_sparsity
    from lowrank_vit.methods.vmeanba import VMeanbaConfig, scan_blocks
    from lowrank_vit.repro.flow import compress_model

    real, switched_when_pruned = method.prune_model, []

    def prune_model(model, config):
        switched_when_pruned.append(sum(op.mean_scan for op in scan_blocks(model).values()))
        return real(model, config)

    patch_everywhere(monkeypatch, method, "prune_model", prune_model)
    model, said = make_vssm(), []
    done = compress_model(model, lambda: [vssm_images()], None, VMeanbaConfig(num_blocks=1, timing=False),
                          device=torch.device("cpu"), progress=False, say=said.append,
                          pruning=PruningConfig(sparsity=0.4))
    assert switched_when_pruned == [1]
    assert said[1] == "pruning 40% of the block linear weights by magnitude (global scope)"
    assert done.pruning["zeros"] == measure_sparsity(model).zeros > 0
    assert done.pruning["sparsity"] == pytest.approx(0.4, abs=0.01) and done.vmeanba["chosen"]
    assert set(done.seconds) == {"vmeanba", "pruning"}


@pytest.mark.usefixtures("offline")
def test_pruning_with_a_low_rank_step_is_refused_before_any_work(monkeypatch):
    from lowrank_vit import CompressionConfig, pipeline
    from lowrank_vit.methods.prune import PruningConfig
    from lowrank_vit.repro.flow import compress_model

    ran = []
    patch_everywhere(monkeypatch, pipeline, "compress", lambda *args: ran.append(args))
    with pytest.raises(ValueError, match="replaces the pruned weights by dense factors"):
        compress_model(torch.nn.Linear(2, 2), lambda: [], CompressionConfig(reduction=0.5),
                       device=torch.device("cpu"), progress=False, pruning=PruningConfig())
    assert ran == []
