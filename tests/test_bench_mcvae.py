"""benchmarks/bench_mcvae.py end to end on a slice of BIKED: both split cases, the paper table with the baselines,
and the generative-quality table."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_mcvae_tables(tmp_path, biked_frame, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    csv = tmp_path / "slice.csv"
    biked_frame.head(400).to_csv(csv, index=False)
    bench = load("bench_mcvae")
    assert bench.main(["--configs", "mcvae_biked", "--epochs", "2", "--split_seeds", "0", "1", "--train_seeds", "42",
                       "--csv_path", str(csv), "--workers", "1", "--results", str(tmp_path / "out"),
                       "--set", "evaluation.samples_per_design=4", "--set", "evaluation.prior_draws=1"]) == 0
    printed = capsys.readouterr().out
    assert "authors' split (85/15" in printed and "project splits (80/10/10)" in printed
    report = json.loads((tmp_path / "out" / "bench_mcvae.json").read_text())
    assert report["timing"]["mcvae_biked"]["epochs"] == 2
    paper = {row[""]: row for row in report["tables"]["paper_project"]}
    assert paper["paper (one run, the authors' split)"]["mean"] == "0.0883"
    assert {"mcvae_biked", "baseline: train_mean", "baseline: conditional_forest"} <= set(paper)
    assert "±" in paper["mcvae_biked"]["mean"]  # two split seeds: mean ± sd
    quality = {row[""]: row for row in report["tables"]["quality_authors"]}
    assert {"mcvae_biked", "baseline: conditional_forest", "baseline: train_sample"} <= set(quality)
    assert quality["mcvae_biked"]["ES < forest"].endswith("%")
    markdown = (tmp_path / "out" / "bench_mcvae.md").read_text()
    assert markdown.count("| mcvae_biked |") == 4  # two split cases × (paper table, quality table)


def test_tradeoff_curve(tmp_path, biked_frame, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    csv = tmp_path / "slice.csv"
    biked_frame.head(400).to_csv(csv, index=False)
    tradeoff = load("tradeoff_mcvae")
    assert tradeoff.main(["--split_seeds", "0", "--temperatures", "0", "1", "--epochs", "2", "--csv_path", str(csv),
                          "--results", str(tmp_path / "out")]) == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "out" / "tradeoff_mcvae_biked.csv")
    assert table["temperature"].tolist() == [0.0, 1.0]
    assert table.loc[0, "diversity_ratio"] < 1e-6 < table.loc[1, "diversity_ratio"]  # τ = 0: one design
    assert table["conditional_forest_energy_score"].nunique() == 1  # the baselines do not depend on τ
    assert (tmp_path / "out" / "tradeoff_mcvae_biked.png").stat().st_size > 10_000


def test_speed_benchmark_reports_the_ratio(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    speed = load("bench_mcvae_speed")
    assert speed.main(["--epochs", "2", "--repeats", "1", "--logdir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "mcvae_biked_paper: median fit" in printed and "1.00× mcvae_biked_paper" in printed
    assert "mcvae_biked: median fit" in printed


def test_profile_records_only_the_asked_epochs_of_the_real_training_run(tmp_path, biked_frame, capsys):
    csv = tmp_path / "slice.csv"
    biked_frame.head(400).to_csv(csv, index=False)
    profile = load("profile_mcvae")
    out = tmp_path / "profile.json"
    assert profile.main(["--warmup", "1", "--epochs", "2", "--top", "5", "--csv_path", str(csv),
                         "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    # 320 training designs at batch 128 (fused: all of an epoch's steps in one Lightning step): 3 steps an epoch
    assert summary["optimizer_steps"] == 2 * 3
    ops = [row["op"] for row in summary["top"]]
    assert len(ops) == 5 and any(op.startswith(("aten::mm", "aten::addmm")) for op in ops)
    assert all(0 < row["share_of_wall"] < 1 for row in summary["top"])
    assert summary["aten_calls_per_step"] > 100  # forward, backward and optimizer of a 6-layer MLP VAE
    assert "| operator | self ms |" in capsys.readouterr().out
