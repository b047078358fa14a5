"""The measured tables in docs/loss_aware_study.md are the committed study results, cell for cell (a re-run that changes
a number must change the docs with it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from experiments.any_output_study import render

ROOT = Path(__file__).resolve().parents[1]
RATIOS = (0.4, 0.5, 0.6, 0.7, 0.8)


def _section(text: str, heading: str) -> list[list[str]]:
    """The rows (cells stripped of bold) of the first table after ``heading``."""
    body = text[text.index(heading):]
    rows, started = [], False
    for line in body.splitlines()[1:]:
        if line.startswith("|"):
            started = True
            cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-"):
                rows.append(cells)
        elif started:
            break
    return rows[1:]  # without the header


def _by_model(rows: list[list[str]]) -> list[tuple[str, list[str]]]:
    out, model = [], None
    for cells in rows:
        model = re.sub(r" \(.*\)$", "", cells[0]) or model
        out.append((model, cells[1:]))
    return out


def test_loss_aware_docs_tables_are_the_committed_results():
    text = (ROOT / "docs/loss_aware_study.md").read_text()
    study = json.loads((ROOT / "experiments/results/loss_aware_study.json").read_text())
    checked = 0
    for heading, key, fmt in (("### Top-1 (%) without fine-tuning", "top1", ".2f"),
                              ("### KL divergence of the predictions", "kl", ".1e")):
        for model, (recipe, *values) in _by_model(_section(text, heading)):
            cells = study[model]["cells"]
            for ratio, value in zip(RATIOS, values, strict=True):
                assert value == format(cells[f"{recipe}@{ratio}"][key], fmt), (heading, model, recipe, ratio)
                checked += 1
    ft = json.loads((ROOT / "experiments/results/loss_aware_study_ft.json").read_text())
    for model, (recipe, *values) in _by_model(_section(text, "### Top-1 (%) after the partial fine-tune")):
        for ratio, value in zip((0.5, 0.7, 0.8), values, strict=True):
            cell = ft[model]["cells"][f"{recipe}@{ratio}"]
            assert value.replace("*", "") == f"{cell['top1']:.2f} / {cell['top1_ft']:.2f}", (model, recipe, ratio)
            checked += 1
    assert checked > 200


def test_gram_precision_table_is_the_committed_results():
    """docs/loss_aware_study.md's float32-against-float64 table is precision_table() of the committed study,
    verbatim, and every one of its cells was computed (the default's precision rests on it)."""
    from experiments.loss_aware_study import precision_table

    study = json.loads((ROOT / "experiments/results/loss_aware_study.json").read_text())
    table = precision_table(study)
    assert table in (ROOT / "docs/loss_aware_study.md").read_text()
    assert "—" not in table and table.count("\n") == 2 + 3 * len(study)


def test_refit_table_is_the_committed_results():
    """The sequential refit's table (default -> refit, and the refit's KL as a multiple of the default's) matches the
    committed study for every model whose refit cells it holds (the CIFAR-10 models; the stand-ins' rows come from
    stand-ins trained on an earlier machine, see docs/loss_aware_study.md)."""
    text = (ROOT / "docs/loss_aware_study.md").read_text()
    study = json.loads((ROOT / "experiments/results/loss_aware_study.json").read_text())
    checked = 0
    for cells in _section(text, "default's.\n\n| model | -40%"):
        model, values = cells[0], cells[1:]
        entry = study[model]["cells"]
        if f"loss-aware-refit@{RATIOS[0]}" not in entry:
            continue
        for ratio, value in zip(RATIOS, values, strict=True):
            default, refit = entry[f"loss-aware@{ratio}"], entry[f"loss-aware-refit@{ratio}"]
            multiple = f"{refit['kl'] / default['kl']:.2f}x"
            expected = f"{default['top1']:.2f} → {refit['top1']:.2f} ({multiple})"
            assert value.replace("(KL ", "(") == expected, (model, ratio)
            checked += 1
    assert checked >= 25


def test_bfloat16_pass_table_is_the_committed_results():
    """docs/loss_aware_study.md's float32 / bfloat16 loss-aware pass table: top-1 of each and the KL's change, from the
    committed study's loss-aware and la-bf16 cells."""
    text = (ROOT / "docs/loss_aware_study.md").read_text()
    study = json.loads((ROOT / "experiments/results/loss_aware_study.json").read_text())
    rows = _section(text, "the change of the KL to the dense model (bfloat16 against float32):")
    for model, *values in rows:
        cells = study[model]["cells"]
        for ratio, value in zip(RATIOS, values, strict=True):
            exact, rounded = cells[f"loss-aware@{ratio}"], cells[f"la-bf16@{ratio}"]
            change = round(100 * (rounded["kl"] / exact["kl"] - 1), 1) + 0.0
            assert value == f"{exact['top1']:.2f} / {rounded['top1']:.2f}, {change:+.1f}%", (model, ratio)
    assert len(rows) == 5


def test_bfloat16_timing_tables_are_the_committed_benchmarks():
    """docs/loss_aware_study.md's two timing tables of the bfloat16 pass (the Xeon with AMX, the AMD EPYC without)
    are the committed benchmark JSONs: forward, statistics, whole compress, the ratio and every run's ratio."""
    text = (ROOT / "docs/loss_aware_study.md").read_text()
    names = {"loss-aware (default)": "loss-aware", "loss-aware, `loss_pass_dtype=\"bfloat16\"`": "loss-aware-bf16",
             "loss-aware-fast": "loss-aware-fast",
             "loss-aware-fast, `loss_pass_dtype=\"bfloat16\"`": "loss-aware-fast-bf16", "paper": "paper"}
    for heading, json_name in (("(`benchmarks/results/compress_time_deit_small_bf16.json`):", "bf16"),
                               ("(`benchmarks/results/compress_time_deit_small_bf16_amd.json`, same command):",
                                "bf16_amd")):
        bench = json.loads((ROOT / f"benchmarks/results/compress_time_deit_small_{json_name}.json").read_text())
        by_recipe = {row["recipe"]: row for row in bench["rows"]}
        rows = _section(text, heading)
        assert [names[cells[0]] for cells in rows] == list(by_recipe)
        for label, forward, statistics, whole, ratio in rows:
            row = by_recipe[names[label]]
            runs = ", ".join(f"{r + 1:.2f}" for r in row["overhead_ratio_runs"])
            assert [forward, statistics, whole] == [f"{row[k]:.1f} s" for k in
                                                    ("calibration_forward_s", "statistics_s", "total_s")], label
            assert ratio == f"{row['overhead_ratio'] + 1:.1f}x (runs {runs})", (json_name, label)


def test_models_added_after_the_default_are_the_committed_results():
    """docs/loss_aware_study.md's check of the default on the two models added after it was chosen: top-1 and KL without
    fine-tuning, and top-1 before / after the fine-tune, cell for cell from their own committed results."""
    text = (ROOT / "docs/loss_aware_study.md").read_text()
    study = json.loads((ROOT / "experiments/results/loss_aware_study_heldout.json").read_text())
    ft = json.loads((ROOT / "experiments/results/loss_aware_study_heldout_ft.json").read_text())
    checked = 0
    for heading, key, fmt in (("Top-1 (%) without fine-tuning, the two added models", "top1", ".2f"),
                              ("KL to the dense model (nats), the two added models", "kl", ".1e")):
        for model, (recipe, *values) in _by_model(_section(text, heading)):
            for ratio, value in zip(RATIOS, values, strict=True):
                assert value == format(study[model]["cells"][f"{recipe}@{ratio}"][key], fmt), (model, recipe, ratio)
                checked += 1
    for model, (recipe, *values) in _by_model(_section(text, "Top-1 (%) before / after the fine-tune, the two")):
        for ratio, value in zip((0.5, 0.7, 0.8), values, strict=True):
            cell = ft[model]["cells"][f"{recipe}@{ratio}"]
            assert value == f"{cell['top1']:.2f} / {cell['top1_ft']:.2f}", (model, recipe, ratio)
            checked += 1
    assert {model for model, _ in _by_model(_section(text, "the two added models"))} == set(study) == set(ft)
    assert checked >= 2 * (2 * 6 * 5 + 4 * 3)


def test_gpu_tables_are_the_committed_benchmarks():
    """benchmarks/README.md's H100 tables (inference and compression time) are the committed GPU JSONs, cell for
    cell, and every one of those JSONs names the card it ran on."""
    text = (ROOT / "benchmarks/README.md").read_text()
    results = ROOT / "benchmarks/results"
    models = {"DeiT-S": "deit_small", "DeiT-B": "deit_base"}
    inference = _section(text, "Inference, batch 256, -50%, medians of 7 interleaved repeats")
    assert [cells[0] for cells in inference] == list(models)
    for model, dense, factorized, speedup, fused, fused_speedup, flops in inference:
        bench = json.loads((results / f"inference_{models[model]}_cuda_h100.json").read_text())
        assert bench["environment"]["gpu"].startswith("NVIDIA H100")
        rows = bench["rows"]
        assert [r["rank_multiple"] for r in rows] == [1, 8]
        assert dense == f"{rows[0]['dense_ms']:.1f}" and flops == f"{rows[0]['flop_speedup']:.2f}"
        for cell, key, fmt in ((factorized, "factorized_ms", "{:.1f}"), (speedup, "speedup", "{:.2f}x"),
                               (fused, "fused_ms", "{:.1f}"), (fused_speedup, "fused_speedup", "{:.2f}x")):
            assert cell == " / ".join(fmt.format(r[key]) for r in rows), (model, key)
    names = {"loss-aware (default)": "loss-aware", "loss-aware, `loss_pass_dtype=\"bfloat16\"`": "loss-aware-bf16"}
    timing = _section(text, "`compress`, 1024 calibration images in batches of 64, -50%, medians of 3 runs")
    checked = 0
    for model, label, forward, statistics, decomposition, allocation, refit, whole, ratio in timing:
        bench = json.loads((results / f"compress_time_{models[model]}_cuda_h100.json").read_text())
        assert bench["environment"]["gpu"].startswith("NVIDIA H100") and bench["environment"]["device"] == "cuda"
        row = {r["recipe"]: r for r in bench["rows"]}[names.get(label, label)]
        assert [forward, statistics, decomposition, allocation, whole] == [
            f"{row[k]:.2f} s" for k in ("calibration_forward_s", "statistics_s", "decomposition_s", "allocation_s",
                                        "total_s")], (model, label)
        assert refit == (f"{row['refit_s']:.2f} s" if row["refit_s"] else ""), (model, label)
        runs = ", ".join(f"{r + 1:.1f}" for r in row["overhead_ratio_runs"])
        assert ratio == f"{row['overhead_ratio'] + 1:.1f}x ({runs})", (model, label)
        checked += 1
    assert checked == 9
    steps = _section(text, "The partial fine-tune, one optimizer step at batch 128 of the model at -50%")
    assert len(steps) == 6
    for model, precision, step_ms, images, speedup in steps:
        bench = json.loads((results / f"finetune_step_{models[model]}_cuda_h100.json").read_text())
        assert bench["environment"]["gpu"].startswith("NVIDIA H100")
        row = {r["precision"]: r for r in bench["rows"]}[precision.strip("`")]
        assert [step_ms, images, speedup] == [f"{row['step_ms']:.1f}", f"{row['images_per_s']:.0f}",
                                              f"{row['speedup']:.2f}x"], (model, precision)


def test_h200_statistics_table_is_the_committed_benchmarks():
    """benchmarks/README.md's before/after table of the loss-aware statistics' host reads is the four committed H200
    JSONs, cell for cell, each naming the card it ran on."""
    text = (ROOT / "benchmarks/README.md").read_text()
    results = ROOT / "benchmarks/results"
    models = {"DeiT-S": "deit_small", "DeiT-B": "deit_base"}
    rows = _section(text, "Measured on one lent H200 in one session, the code before")
    for model, recipe, code, forward, statistics, decomposition, allocation, whole, ratio in rows:
        suffix = {"before": "_before", "after": ""}[code]
        bench = json.loads((results / f"compress_time_{models[model]}_cuda_h200{suffix}.json").read_text())
        assert bench["environment"]["gpu"].startswith("NVIDIA H200") and bench["environment"]["device"] == "cuda"
        row = {r["recipe"]: r for r in bench["rows"]}[recipe]
        assert [forward, statistics, decomposition, allocation, whole] == [
            f"{row[k]:.2f} s" for k in ("calibration_forward_s", "statistics_s", "decomposition_s", "allocation_s",
                                        "total_s")], (model, recipe, code)
        runs = ", ".join(f"{r + 1:.1f}" for r in row["overhead_ratio_runs"])
        assert ratio == f"{row['overhead_ratio'] + 1:.1f}x ({runs})", (model, recipe, code)
    assert [(model, recipe, code) for model, recipe, code, *_ in rows] == [
        (m, r, c) for m, r in (("DeiT-S", "loss-aware"), ("DeiT-S", "paper"), ("DeiT-B", "loss-aware"))
        for c in ("before", "after")]


def test_distillation_tables_are_the_committed_results():
    """docs/loss_aware_study.md's fine-tune tables (cross-entropy against distillation, with and without training the
    factors, and the 600-step check) are finetune_tables() of the committed results, verbatim, and every cell of the
    loss-aware default's table was computed."""
    from experiments.loss_aware_study import FINETUNE_RUNS, finetune_tables

    text = (ROOT / "docs/loss_aware_study.md").read_text()
    tables = finetune_tables(ROOT / "experiments/results")
    for table in tables:
        assert table in text
    default = tables[0]
    assert "—" not in default and default.count("\n") == 2 + 9 * len(FINETUNE_RUNS) + 1


def test_peers_tables_are_the_committed_results():
    """docs/peers.md's tables are peers_summary / peers_table / peers_kl_table of the committed peers studies (256 and
    1,024 calibration images, and after the fine-tune), the SVD-LLM v2 unit ablation, FLAR-SVD's latency rule and
    shrinkage measurements, verbatim; and its headline holds in them: without fine-tuning no peer is significantly
    better than the default in any cell, nor closer to the dense model's predictions."""
    from experiments import flar_latency, flar_shrinkage
    from experiments.loss_aware_study import PEERS, peers_kl_table, peers_summary, peers_table

    text = (ROOT / "docs/peers.md").read_text()
    results = ROOT / "experiments/results"
    noft = json.loads((results / "peers_study.json").read_text())
    ft = json.loads((results / "peers_study_ft.json").read_text())
    more = json.loads((results / "peers_study_1024.json").read_text())
    others = (*PEERS, "vanilla", "paper")
    halves = ("la-integer", "kfac-marginal", "kfac-lems")
    held_out = (*PEERS[:1], "flar-svd-held-out", *PEERS[1:], "vanilla", "paper")
    units = ("svd-llm-v2-loss-tokens",)
    tables = [peers_summary(noft, others=others), peers_table(noft, others=others), peers_kl_table(noft, others=others),
              peers_summary(ft, key="top1_ft", at=(0.5, 0.7, 0.8)), peers_table(ft, key="top1_ft"),
              peers_summary(noft, others=halves), peers_table(noft, others=halves),
              peers_summary(more, others=held_out, at=(0.5, 0.7)), peers_table(more, others=held_out),
              peers_summary(more, others=("flar-svd-held-out",), default="flar-svd", at=(0.5, 0.7)),
              peers_summary(noft, others=units, default="svd-llm-v2"),
              peers_table(noft, others=units, default="svd-llm-v2"),
              flar_latency.render(json.loads((results / "flar_latency.json").read_text())),
              flar_shrinkage.render(json.loads((results / "flar_shrinkage.json").read_text()))]
    for table in tables:
        assert table in text
    assert "WINS" not in tables[1] and "WINS" not in tables[4] and "WINS" not in tables[8]
    for line in tables[0].splitlines()[2:]:  # better, worse, compared, not reached, lower KL
        assert line.split("|")[-6].strip() == "0" and line.split("|")[-2].strip() == "0", line
    assert len(noft) == 10 and sum(len(entry["cells"]) for entry in noft.values()) == 10 * 5 * 11
    assert len(more) == 10 and {entry["settings"]["calib"] for entry in more.values()} == {1024}


def test_speed_tables_are_the_committed_benchmarks():
    """docs/speed.md shows each committed latency benchmark exactly as benchmarks/latency.py renders it."""
    import importlib.util
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("benchmarks_latency_docs", ROOT / "benchmarks" / "latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (ROOT / "docs/speed.md").read_text()
    results = sorted((ROOT / "benchmarks/results").glob("latency_*.json"))
    assert results, "no committed latency benchmark"
    for path in results:
        table = module.markdown(json.loads(path.read_text()))
        assert table in text, f"docs/speed.md does not show {path.name} as benchmarks/latency.py renders it"


def test_latency_study_table_is_the_committed_results():
    from experiments.latency_study import markdown

    study = json.loads((ROOT / "experiments/results/latency_study.json").read_text())
    assert markdown(study) in (ROOT / "docs/speed.md").read_text()


def test_vmeanba_study_tables_are_the_committed_results():
    from experiments.vmeanba_study import markdown

    study = json.loads((ROOT / "experiments/results/vmeanba_study.json").read_text())
    assert markdown(study) in (ROOT / "docs/vmeanba.md").read_text()


def test_vmeanba_registry_table_is_the_committed_smoke_run():
    """docs/vmeanba.md's table of the registry rows at smoke scale is `reproduce vmeanba --scale smoke`'s committed
    table JSON, cell for cell, and the KL range the text quotes is the rows' own."""
    data = json.loads((ROOT / "experiments/results/vmeanba_smoke.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    text = (ROOT / "docs/vmeanba.md").read_text()
    shown = _section(text, "Measured: `lowrank-vit reproduce vmeanba --scale smoke")
    assert len(shown) == 7

    def times(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}x"

    for cells in shown:
        r = rows[cells[0].strip("`")]
        assert cells[1:] == [f"{r['params_m']:.3f}", f"{r['top1_dense']:.2f}", f"{r['top1']:.2f}",
                             "—" if r["vmeanba_blocks"] is None else str(r["vmeanba_blocks"]),
                             times(r["scan_speedup"]), times(r["model_speedup"])], cells[0]
    kls = [r["vmeanba_kl"] for r in data["rows"] if r["vmeanba_kl"] is not None]
    assert f"{min(kls):.0e} to {max(kls):.0e} nats".replace("e-0", "e-") in text


def test_any_output_docs_tables_are_the_committed_results():
    """Every table of docs/any_output.md's study is rendered from the committed results, and each results file's
    markdown beside it is the same rendering."""
    text = (ROOT / "docs/any_output.md").read_text()
    for name in ("any_output_study", "any_output_headless_10k", "any_output_embed", "any_output_seg"):
        results = json.loads((ROOT / f"experiments/results/{name}.json").read_text())
        rendered = render(results)
        assert (ROOT / f"experiments/results/{name}.md").read_text() == rendered
        for table in rendered.split("### ")[1:]:
            assert table.strip() in text.replace("#### ", ""), table.splitlines()[0]
