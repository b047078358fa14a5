"""The vision state-space model (nn/vssm.py), its selective scan (core/scan.py) and VMeanba (methods/vmeanba.py):
the doubling scan against the step-by-step recurrence, the channel-mean scan against the recurrence run on averages
computed here, the four-path reading against its inverse, the low-rank methods and VMeanba on the model, and
saving, loading and exporting what they produce."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lowrank_vit.core.scan import channel_mean_scan, selective_scan, selective_scan_reference
from lowrank_vit.nn.adapters import get_adapter, timm_with_our_models
from lowrank_vit.nn.vssm import SS2D, cross_merge, cross_scan

# not the defaults: odd widths, a non-square input, two states, three blocks over two stages
KWARGS = {"img_size": 24, "patch_size": 3, "num_classes": 5, "embed_dim": 12, "depths": [2, 1], "d_state": 2,
          "ssm_ratio": 1.5}


def scan_problem(seed: int, b: int, d: int, n: int, length: int, groups: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, length, generator=g)
    delta = F.softplus(torch.randn(b, d, length, generator=g) - 1)
    A = -torch.exp(torch.randn(d, n, generator=g))  # decays from slow to fast, over two decades
    B = torch.randn(b, groups, n, length, generator=g)
    C = torch.randn(b, groups, n, length, generator=g)
    D = torch.randn(d, generator=g)
    return u, delta, A, B, C, D


def make_vssm(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm_with_our_models().create_model("vssm_micro", pretrained=False, **{**KWARGS, **overrides})
    with torch.no_grad():  # torch's default scale (1/sqrt(fan_in)), so that every block matters, unlike std 0.02
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".dt_proj." not in name:
                module.reset_parameters()
        # a head that separates classes, and non-zero biases and norm affines everywhere
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        model.head.weight.mul_(50)
        for op in (m for m in model.modules() if isinstance(m, SS2D)):  # step sizes near 1: the scans matter
            for proj in op.dt_proj:
                proj.bias.normal_(0.5, 0.5)
            op.D.mul_(0.2)
    return model.eval()


# lengths below, at and between powers of two (the doubling scan's rounds), one to four groups, one to four states
@pytest.mark.parametrize("seed, shape", [(0, (2, 6, 3, 37, 3)), (1, (1, 4, 1, 64, 4)), (2, (3, 8, 2, 5, 2)),
                                         (3, (2, 4, 4, 50, 1)), (9, (1, 2, 1, 1, 1)), (10, (2, 3, 2, 2, 3))])
def test_doubling_scan_is_the_recurrence(seed, shape):
    args = scan_problem(seed, *shape)
    expected = selective_scan_reference(*args)
    assert torch.allclose(selective_scan(*args), expected, atol=1e-5, rtol=1e-4)
    # float64 inputs: agreement to float64 rounding
    args64 = [t.double() for t in args]
    assert torch.allclose(selective_scan(*args64), selective_scan_reference(*args64), atol=1e-12)


def test_doubling_scan_gradients_are_the_recurrences():
    args = [t.double().requires_grad_() for t in scan_problem(4, 2, 4, 2, 19, 2)]
    weights = torch.randn(2, 4, 19, dtype=torch.float64)
    (selective_scan(*args) * weights).sum().backward()
    chunked = [t.grad.clone() for t in args]
    for t in args:
        t.grad = None
    (selective_scan_reference(*args) * weights).sum().backward()
    for got, want in zip(chunked, [t.grad for t in args], strict=True):
        assert torch.allclose(got, want, atol=1e-10)


def test_fast_decaying_channels_do_not_overflow():
    u, delta, A, B, C, D = scan_problem(5, 1, 2, 1, 200, 1)
    A = torch.full_like(A, -80.0)  # exp(-sum delta A) would overflow float32 within a few steps
    y = selective_scan(u, delta * 4, A, B, C, D)
    assert torch.isfinite(y).all()
    assert torch.allclose(y, selective_scan_reference(u, delta * 4, A, B, C, D), atol=1e-5, rtol=1e-4)


def test_channel_mean_scan_is_one_scan_of_the_group_means():
    u, delta, A, B, C, D = scan_problem(6, 2, 6, 2, 23, 3)  # 3 groups of 2 channels
    y = channel_mean_scan(u, delta, A, B, C, D)
    for group in range(3):
        channels = slice(2 * group, 2 * group + 2)
        mean = selective_scan_reference(u[:, channels].mean(1, keepdim=True), delta[:, channels].mean(1, keepdim=True),
                                        A[channels].mean(0, keepdim=True), B[:, group:group + 1],
                                        C[:, group:group + 1])
        for c in range(2 * group, 2 * group + 2):
            assert torch.allclose(y[:, c], mean[:, 0] + D[c] * u[:, c], atol=1e-5)


def test_channel_mean_scan_is_exact_when_a_groups_channels_agree():
    u, delta, A, B, C, D = scan_problem(7, 2, 6, 3, 17, 2)
    def same(t: torch.Tensor) -> torch.Tensor:  # every channel of a group takes its group's first channel
        return t.reshape(t.shape[0], 2, 3, *t.shape[2:])[:, :, :1].expand(-1, -1, 3, *t.shape[2:]).reshape(t.shape)

    u, delta = same(u), same(delta)
    A = A.reshape(2, 3, 3)[:, :1].expand(2, 3, 3).reshape(6, 3)
    assert torch.allclose(channel_mean_scan(u, delta, A, B, C, D), selective_scan_reference(u, delta, A, B, C, D),
                          atol=1e-5)


def test_scan_shape_errors_name_the_arguments():
    u, delta, A, B, C, D = scan_problem(8, 2, 6, 2, 9, 3)
    with pytest.raises(ValueError, match=r"A must be \(channels, states\) = \(6, n\)"):
        selective_scan(u, delta, A[:5], B, C)
    with pytest.raises(ValueError, match=r"6 channels cannot be split into 4 groups"):
        selective_scan(u, delta, A, B.repeat(1, 2, 1, 1)[:, :4], C.repeat(1, 2, 1, 1)[:, :4])


def test_cross_merge_inverts_cross_scan_on_a_non_square_map():
    x = torch.randn(2, 3, 4, 7)
    paths = cross_scan(x)
    assert paths.shape == (2, 4, 3, 28)
    assert torch.equal(paths[:, 1, :, :4], x[:, :, :, 0])  # the second path reads the first column first
    assert torch.equal(paths[:, 2, :, 0], x[:, :, -1, -1])  # the third reads the rows backwards
    assert torch.allclose(cross_merge(paths, 4, 7), 4 * x)


def test_ss2d_matches_a_step_by_step_scan():
    op = make_vssm().layers[0].blocks[0].op
    x = torch.randn(2, 8, 8, 12)
    with torch.no_grad():
        b, h, w, _ = x.shape
        y = selective_scan_reference(*op.scan_inputs(x))
        expected = op.out_proj(op.out_norm(cross_merge(y.reshape(b, 4, op.inner, h * w), h, w).permute(0, 2, 3, 1)))
        assert torch.allclose(op(x), expected, atol=1e-5)


def test_published_sizes():
    timm = timm_with_our_models()
    counts = {name: sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters()) / 1e6
              for name in ("vmamba_tiny", "vmamba_small", "vmamba_base")}
    # VMamba's published 30M, 50M and 89M
    assert counts["vmamba_tiny"] == pytest.approx(30, rel=0.03)
    assert counts["vmamba_small"] == pytest.approx(50, rel=0.03)
    assert counts["vmamba_base"] == pytest.approx(89, rel=0.03)


def test_the_adapter_lists_the_scans_linears_per_block():
    model = make_vssm()
    adapter = get_adapter(model)
    blocks = adapter.layers_by_block(model)
    assert list(blocks) == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0"]
    first = [name.removeprefix("layers.0.blocks.0.") for name in blocks["layers.0.blocks.0"]]
    assert first == ["op.in_proj", *[f"op.x_proj.{k}" for k in range(4)], *[f"op.dt_proj.{k}" for k in range(4)],
                     "op.out_proj", "mlp.fc1", "mlp.fc2"]
    assert list(adapter.scan_modules(model)) == [f"{b}.op" for b in blocks]
    assert adapter.attention_modules(model) == {}
    spec = adapter.model_spec(model)
    rebuilt = adapter.build(spec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def agreeing_channels_(op: SS2D) -> None:
    """Make every channel of each scan path of ``op`` carry the same u, delta and A: the channel-mean scan is then
    exact there, so the block's impact is zero (up to rounding) whatever the rest of the model does."""
    with torch.no_grad():
        op.in_proj.weight.copy_(op.in_proj.weight[:1].expand_as(op.in_proj.weight))
        op.conv2d.weight.copy_(op.conv2d.weight[:1].expand_as(op.conv2d.weight))
        op.conv2d.bias.fill_(float(op.conv2d.bias[0]))
        for proj in op.dt_proj:
            proj.weight.copy_(proj.weight[:1].expand_as(proj.weight))
            proj.bias.fill_(float(proj.bias[0]))
        op.A_log.copy_(op.A_log[:1].expand_as(op.A_log))


def images(n: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 24, 24, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("agreeing", ["layers.0.blocks.1.op", "layers.1.blocks.0.op"])
def test_vmeanba_switches_the_block_whose_channels_agree(agreeing):
    from lowrank_vit.methods.vmeanba import apply_vmeanba

    model = make_vssm()
    agreeing_channels_(model.get_submodule(agreeing))
    x = images()
    with torch.no_grad():
        dense = model(x)
    report = apply_vmeanba(model, [x[:7], x[7:]], num_blocks=1, timing=False, progress=False)  # 7: not a divisor
    assert report.chosen == [agreeing]
    assert abs(report.scores[agreeing]) < 1e-6
    assert min(score for name, score in report.scores.items() if name != agreeing) > 1e-4
    assert [name for name, op in get_adapter(model).scan_modules(model).items() if op.mean_scan] == [agreeing]
    with torch.no_grad():
        assert torch.allclose(model(x), dense, atol=1e-4)  # exact there: nothing changed
    assert abs(report.kl) < 1e-6


def test_vmeanba_kl_is_the_models_and_k_blocks_follow_the_scores():
    from lowrank_vit.methods.vmeanba import apply_vmeanba

    model = make_vssm(seed=3)
    x = images(16, seed=2)
    with torch.no_grad():
        dense = F.log_softmax(model(x), -1)
    report = apply_vmeanba(model, x, num_blocks=2, timing=False, progress=False)
    assert report.chosen == sorted(report.scores, key=report.scores.get)[:2]
    with torch.no_grad():
        switched = F.log_softmax(model(x), -1)
    assert report.kl == pytest.approx(float((dense.exp() * (dense - switched)).sum(-1).mean()), rel=1e-5)
    assert model.training is False


def test_vmeanba_by_target_speedup_adds_blocks_until_the_prediction_reaches_it():
    from lowrank_vit.methods.vmeanba import _by_speedup

    scores = {"a": 0.3, "b": 0.1, "c": 0.2}
    savings = {"a": 10.0, "b": 5.0, "c": 20.0}
    assert _by_speedup(scores, savings, 100.0, 1.05) == ["b"]  # 100/95
    assert _by_speedup(scores, savings, 100.0, 1.3) == ["b", "c"]  # 100/75 = 1.33
    assert _by_speedup(scores, savings, 100.0, 1.5) == ["b", "c", "a"]  # 100/65 = 1.54
    with pytest.raises(ValueError, match=r"a 1.6x speedup is out of reach: switching all 3 selective-scan blocks is "
                                         r"predicted to give 1.538x"):
        _by_speedup(scores, savings, 100.0, 1.6)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_blocks": 4}, r"num_blocks=4 but the model has 3 selective-scan block\(s\): choose 1 to 3"),
    ({"num_blocks": 0}, r"num_blocks must be a positive integer, not 0"),
    ({}, r"exactly one of num_blocks=K and target_speedup=S"),
    ({"num_blocks": 1, "target_speedup": 1.2}, r"exactly one of num_blocks=K and target_speedup=S"),
    ({"target_speedup": 0.9}, r"target_speedup must be a number above 1, not 0.9"),
])
def test_vmeanba_bad_settings(kwargs, message):
    from lowrank_vit.methods.vmeanba import apply_vmeanba

    with pytest.raises(ValueError, match=message):
        apply_vmeanba(make_vssm(), images(4), progress=False, **kwargs)


def test_vmeanba_on_a_vision_transformer_names_what_it_found():
    import timm

    from lowrank_vit.methods.vmeanba import apply_vmeanba

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=24, patch_size=8, depth=2,
                            embed_dim=16, num_heads=2)
    with pytest.raises(ValueError, match=r"VisionTransformer has no selective-scan block \(found 2 attention "
                                         r"block\(s\)\): VMeanba applies to vision state-space models"):
        apply_vmeanba(vit, images(4), num_blocks=1, progress=False)


@pytest.mark.parametrize("recipe_name", ["paper", "loss-aware"])
def test_low_rank_and_vmeanba_together_save_load_and_export(tmp_path, recipe_name):
    pytest.importorskip("onnxruntime")
    from lowrank_vit import compress, load_compressed, save_compressed
    from lowrank_vit.config import recipe
    from lowrank_vit.io.export import export_onnx, onnx_logits
    from lowrank_vit.io.surgery import read_plan
    from lowrank_vit.methods.vmeanba import apply_vmeanba
    from lowrank_vit.nn.factorized import FactorizedLinear

    model = make_vssm(seed=4)
    x = images(20, seed=5)
    apply_vmeanba(model, [x[:9], x[9:]], num_blocks=2, timing=False, progress=False)
    compress(model, [x[:9], x[9:]], recipe(recipe_name, reduction=0.3, calib_samples=20, progress=False))
    factorized = [n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]
    assert any(".op." in n for n in factorized) and any(".mlp." in n for n in factorized), factorized
    save_compressed(model, tmp_path / "m")
    switched = [n for n, op in get_adapter(model).scan_modules(model).items() if op.mean_scan]
    assert read_plan(tmp_path / "m")["mean_scan"] == switched and len(switched) == 2
    loaded = load_compressed(tmp_path / "m")
    assert [n for n, op in get_adapter(loaded).scan_modules(loaded).items() if op.mean_scan] == switched
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(loaded(x), expected)
    export_onnx(loaded, tmp_path / "m.onnx", (3, 24, 24))
    got = onnx_logits(tmp_path / "m.onnx", x)
    assert float((got - expected).norm() / expected.norm()) < 1e-4


def test_a_plan_naming_a_mean_scan_block_that_is_not_one_is_refused(tmp_path):
    import json

    from lowrank_vit import load_compressed, save_compressed
    from lowrank_vit.methods.vmeanba import apply_vmeanba

    model = make_vssm()
    apply_vmeanba(model, images(4), num_blocks=1, timing=False, progress=False)
    save_compressed(model, tmp_path / "m")
    plan = json.loads((tmp_path / "m" / "lowrank_vit.json").read_text())
    plan["mean_scan"] = ["layers.0.blocks.0.mlp"]
    (tmp_path / "m" / "lowrank_vit.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r"saved mean-scan block layers.0.blocks.0.mlp is not a selective scan in "
                                         r"vssm_micro: mismatched model"):
        load_compressed(tmp_path / "m")
    plan["mean_scan"] = "layers.0.blocks.0.op"
    (tmp_path / "m" / "lowrank_vit.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r"'mean_scan' must be a list of module names"):
        load_compressed(tmp_path / "m")


# ------------------------------------------------------------------------------------------- the command line

CLI_KWARGS = {"patch_size": 4, "num_classes": 3, "embed_dim": 16, "depths": [2, 1], "d_state": 2, "ssm_ratio": 1.5}


@pytest.fixture(scope="module")
def ssm_workdir(tmp_path_factory):
    import json

    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ssm_cli")
    rng = np.random.default_rng(0)
    for i in range(18):
        label = i % 3
        folder = root / "imgs" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((24, 24, 3)) * 80 + label * 70).astype(np.uint8)).save(folder / f"{i}.png")
    model = make_vssm(seed=6, img_size=24, **CLI_KWARGS)
    save_file(model.state_dict(), str(root / "ssm.safetensors"),
              metadata={"mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.5, 0.5]", "crop_pct": "1.0"})
    (root / "kwargs.json").write_text(json.dumps(CLI_KWARGS))
    return root


def _cli(capsys, workdir, *extra: str) -> tuple[int, str, str]:
    import json

    from lowrank_vit.cli import main as cli

    code = cli.main(["compress", "vssm_micro", "--preprocessing", "timm", "--checkpoint",
                     str(workdir / "ssm.safetensors"), "--model-kwargs",
                     json.dumps(CLI_KWARGS), "--input-size", "24", "--data", str(workdir / "imgs"), "--workers", "0",
                     "--calib-samples", "12", "--quiet", *map(str, extra)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_compresses_a_state_space_model_with_vmeanba_and_with_both(ssm_workdir, tmp_path, capsys):
    import json

    from lowrank_vit import load_compressed
    from lowrank_vit.io.surgery import read_plan

    code, out, err = _cli(capsys, ssm_workdir, "--recipe", "vmeanba", "--vmeanba-blocks", "2", "--no-timing",
                          "--output", tmp_path / "v")
    assert code == 0, err
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert len(report["vmeanba"]["chosen"]) == 2 and report["reduction"] == 0
    assert sorted(read_plan(tmp_path / "v")["mean_scan"]) == sorted(report["vmeanba"]["chosen"])
    assert "VMeanba on 2 block(s)" in out
    loaded = load_compressed(tmp_path / "v")
    assert sum(op.mean_scan for op in get_adapter(loaded).scan_modules(loaded).values()) == 2

    code, out, err = _cli(capsys, ssm_workdir, "--recipe", "loss-aware", "--reduction", "0.3", "--vmeanba-blocks",
                          "1", "--no-timing", "--output", tmp_path / "both")
    assert code == 0, err
    report = json.loads((tmp_path / "both" / "report.json").read_text())
    assert len(report["vmeanba"]["chosen"]) == 1 and report["reduction"] == pytest.approx(0.3, abs=0.02)
    assert report["accuracy"]["after"]["top1"] >= 0 and "VMeanba on 1 block(s)" in out


@pytest.mark.parametrize("extra, needle", [
    (["--recipe", "vmeanba", "--vmeanba-blocks", "4"], "num_blocks=4 but the model has 3 selective-scan block(s)"),
    (["--recipe", "vmeanba", "--reduction", "0.3"], "--recipe vmeanba removes no parameters"),
    (["--recipe", "vmeanba"], "--recipe vmeanba needs exactly one of --vmeanba-blocks K and --target-speedup S"),
    (["--recipe", "paper"], "one of --reduction, --target-params and --target-speedup is required"),
])
def test_cli_vmeanba_bad_input_is_one_line(ssm_workdir, tmp_path, capsys, extra, needle):
    code, out, err = _cli(capsys, ssm_workdir, *extra, "--output", tmp_path / "m")
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lowrank-vit: error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert not (tmp_path / "m").exists()


def test_cli_vmeanba_on_a_vision_transformer_is_one_line(tmp_path, capsys):
    from lowrank_vit.cli import main as cli

    code = cli.main(["compress", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs",
                     '{"depth": 2, "embed_dim": 16, "num_heads": 2, "num_classes": 3}', "--input-size", "32",
                     "--data", str(tmp_path), "--recipe", "vmeanba", "--vmeanba-blocks", "1", "--output",
                     str(tmp_path / "m"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "VisionTransformer has no selective-scan block (found 2 attention block(s))" in err


# ------------------------------------------------------------------------------------------- the registry's rows
_QUICK = ["model.pretrained=false", "data.calib_samples=8", "vmeanba.calib_samples=8", "vmeanba.repeats=1",
          "vmeanba.latency_batch=4"]


@pytest.mark.parametrize("row", ["vmeanba/vmamba_t/vmeanba-k2", pytest.param(
    "vmeanba/vmamba_t/vmeanba-k4-loss-aware-40", marks=pytest.mark.slow)])
def test_a_registry_row_runs_vmeanba_saves_it_and_the_saved_model_scores_what_the_run_recorded(tmp_path, row):
    """The smoke scale's stand-in (random weights here: no pretraining in a test) through `lowrank-vit run`'s driver:
    the K blocks of least impact by the run's own scores are switched, the table shows them, and the saved model
    has exactly those blocks switched and scores the recorded top-1."""
    from lowrank_vit.io.surgery import load_compressed
    from lowrank_vit.methods.vmeanba import scan_blocks
    from lowrank_vit.repro.models import build_model
    from lowrank_vit.repro.registry import get_experiment
    from lowrank_vit.repro.runner import MODEL_DIR, evaluate, run_row
    from lowrank_vit.repro.tables import render_table
    from lowrank_vit.stages.data import build_datamodule

    exp = get_experiment(row)
    extra = ["finetune.max_steps=1", "compression.calib_samples=8"] if exp.smoke.compression else []
    result = run_row(exp, "smoke", output=tmp_path, wandb="disabled", overrides=_QUICK + extra, progress=False)
    scores, chosen = result["vmeanba"]["scores"], result["vmeanba"]["chosen"]
    k = exp.smoke.vmeanba.num_blocks
    assert len(scores) == 14 and chosen == sorted(scores, key=scores.get)[:k]
    model = load_compressed(tmp_path / row / MODEL_DIR)
    assert sorted(name for name, op in scan_blocks(model).items() if op.mean_scan) == sorted(chosen)
    if exp.smoke.compression is not None:
        assert result["params"] < 0.7 * result["params_before"] and result["finetune"]["steps"] == 1
    else:
        assert result["params"] == result["params_before"] and "finetune" not in result
    cfg = exp.smoke.override(_QUICK)
    dm = build_datamodule(cfg.data, build_model(cfg.model, progress=False))
    dm.setup("fit")
    top1 = evaluate(model, dm.val_dataloader(batch_size=256), torch.device("cpu"), progress=False)["top1"]
    assert top1 == pytest.approx(result["top1"], abs=1e-9)
    table = render_table("vmeanba", [exp], "smoke", tmp_path)
    assert f"| {k} | {result['vmeanba']['scan_speedup']:.2f}x | {result['vmeanba']['measured_speedup']:.2f}x |" \
        in table


def test_a_vmeanba_row_on_a_model_without_scans_fails_before_the_model_is_evaluated(tmp_path):
    from lowrank_vit.repro.registry import get_experiment
    from lowrank_vit.repro.runner import run_row

    with pytest.raises(ValueError, match="no selective-scan"):
        run_row(get_experiment("vmeanba/vmamba_t/vmeanba-k2"), "smoke", output=tmp_path, wandb="disabled",
                overrides=[*_QUICK, "model.name=deit_s"], progress=False)
    assert not (tmp_path / "vmeanba/vmamba_t/vmeanba-k2").exists()


def test_switching_scans_for_a_timing_restores_each_ones_own_setting_even_after_an_error():
    from lowrank_vit.methods.vmeanba import scan_blocks, switched

    model = timm_with_our_models().create_model("vssm_micro", pretrained=False)
    a, b = scan_blocks(model).values()
    a.mean_scan, b.mean_scan = True, False
    with pytest.raises(RuntimeError, match="boom"), switched([a, b], False):
        assert (a.mean_scan, b.mean_scan) == (False, False)
        raise RuntimeError("boom")
    assert (a.mean_scan, b.mean_scan) == (True, False)
    with switched([a, b], True):
        assert (a.mean_scan, b.mean_scan) == (True, True)
    assert (a.mean_scan, b.mean_scan) == (True, False)


def test_rows_sharing_a_caveat_share_its_footnote(tmp_path):
    from lowrank_vit.repro.registry import list_experiments
    from lowrank_vit.repro.tables import render_table

    rows = list_experiments("vmeanba/vmamba_t/*")
    text = render_table("vmeanba", rows, "smoke", tmp_path)
    assert text.count("` [1] |") == len(rows) and "[2]" not in text
    assert text.count("VMamba's published weights are not converted") == 1
