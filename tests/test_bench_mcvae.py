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


FAKE_AUTHORS = {
    # top-level imports the loader must not run (torchvision does not import beside this torch)
    "emb_mcvae.py": """import torchvision
from modules.globals import DEVICE


class ConditionMasking(nn.Module):
    def __init__(self, arch, spars_params):
        super().__init__()
        self.p = spars_params["sparsity"]


class ConditionEmbedding(nn.Module):
    def __init__(self, arch):
        super().__init__()
        self.n = len(arch["cond_dims"])


class mcVAE(nn.Module):
    calls = []  # (step, batch rows, condition columns), for the test

    def __init__(self, arch, spars_params):
        super().__init__()
        self.arch = arch
        self.msk = ConditionMasking(arch, spars_params)
        self.lin = nn.Linear(arch["rp_dim"] + len(arch["cond_dims"]), arch["rp_dim"])

    def forward(self, x, y):
        x_hat = self.lin(torch.cat([x, y], 1))
        return x_hat[:, :2], x_hat[:, 2:4], None, None, x_hat
""",
    "data.py": """from diffusers import AutoencoderKL


class RefPointData(Dataset):
    def __init__(self, X, Y):
        self.X, self.Y = torch.tensor(X, dtype=torch.float), torch.tensor(Y, dtype=torch.float)

    def __len__(self):
        return len(self.Y)

    def __getitem__(self, idx):
        return self.X[idx], self.Y[idx]
""",
    "utils.py": """from openTSNE import TSNE


def vae_loss(x, x_hat, mean, logvar, kld_weight):
    return nn.functional.mse_loss(x_hat, x, reduction="sum"), (mean * 0).sum()


def train_step(train_loader, model, loss_fn, optimizer, kld_weight, mean_reduce=False):
    for x, y in train_loader:
        type(model).calls.append(("train", len(x), y.shape[1]))
        optimizer.zero_grad()
        mean, logvar, _, _, x_hat = model(x, y)
        loss = sum(loss_fn(x, x_hat, mean, logvar, kld_weight))
        loss.backward()
        optimizer.step()


def val_step(val_loader, model, loss_fn, kld_weight, mean_reduce=False):
    for x, y in val_loader:
        type(model).calls.append(("val", len(x), y.shape[1]))
""",
}


def fake_authors(root: Path) -> Path:
    (root / "modules").mkdir(parents=True)
    for name, text in FAKE_AUTHORS.items():
        (root / "modules" / name).write_text(text)
    return root


def test_the_authors_loop_runs_their_definitions_alone_on_our_split(tmp_path, biked_frame, capsys):
    """Only the named classes and functions of their files run (not their imports), on this project's training and
    validation rows, every epoch a train_step over batches of 128 and a val_step; the speed report then gives the
    ratio to them. A wrong path or changed code is a clear error."""
    import pytest
    import yaml

    authors = load("authors_mcvae")
    root = fake_authors(tmp_path / "authors")
    csv = tmp_path / "slice.csv"
    biked_frame.head(400).to_csv(csv, index=False)
    raw = yaml.safe_load((ROOT / "configs" / "mcvae_biked_paper.yaml").read_text())
    raw["data"]["csv_path"] = str(csv)
    raw["trainer"]["max_epochs"] = 2
    config = tmp_path / "paper.yaml"
    config.write_text(yaml.safe_dump(raw))
    speed = load("bench_mcvae_speed")
    dm = speed.datamodule_of(str(config))
    namespace = authors.authors_namespace(root)
    assert "AutoencoderKL" not in namespace and "TSNE" not in namespace  # their imports did not run
    seconds = authors.time_authors_loop(namespace, dm, epochs=2)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    n_train, n_val = len(dm.tensors["train"][0]), len(dm.tensors["val"][0])
    calls = namespace["mcVAE"].calls
    train = [c[1] for c in calls if c[0] == "train"]
    assert train == 2 * ([128] * (n_train // 128) + ([n_train % 128] if n_train % 128 else []))
    assert sum(c[1] for c in calls if c[0] == "val") == 2 * n_val
    assert {c[2] for c in calls} == {8}  # seven categorical conditions and the chainring

    assert speed.main(["--configs", str(config), "--repeats", "1", "--logdir", str(tmp_path / "logs"),
                       "--authors", str(root), "--authors_epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "the authors' loop: median" in printed and "× the authors' loop" in printed
    assert speed.main(["--configs", str(config), "--repeats", "1", "--logdir", str(tmp_path / "logs")]) == 0
    assert "the authors' loop: not timed (pass --authors PATH" in capsys.readouterr().out

    with pytest.raises(authors.AuthorsCodeError, match="does not exist: pass --authors the root"):
        authors.authors_namespace(tmp_path / "nowhere")
    (root / "modules" / "utils.py").write_text("def train_step():\n    pass\n")
    with pytest.raises(authors.AuthorsCodeError, match="defines no vae_loss, val_step"):
        authors.authors_namespace(root)


def test_bench_mcvae_stacked_gives_the_tables_of_separate_runs(tmp_path, biked_frame, monkeypatch, capsys):
    """--stack trains split seeds 1 and 2 in one process (modules/stacked.py): the same tables to 4 decimals."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    csv = tmp_path / "slice.csv"
    biked_frame.head(400).to_csv(csv, index=False)
    bench = load("bench_mcvae")
    reports = {}
    for mode in ("separate", "stacked"):
        argv = ["--configs", "mcvae_biked", "--epochs", "2", "--split_seeds", "0", "1", "2", "--train_seeds",
                "--csv_path", str(csv), "--workers", "1", "--results", str(tmp_path / mode),
                "--set", "evaluation.samples_per_design=4", "--set", "evaluation.prior_draws=1",
                "--set", "evaluation.adherence=false"]
        assert bench.main(argv + (["--stack"] if mode == "stacked" else [])) == 0
        reports[mode] = json.loads((tmp_path / mode / "bench_mcvae.json").read_text())["tables"]
    printed = capsys.readouterr().out
    assert "2 stacked (mcvae_biked_project1, mcvae_biked_project2)" in printed
    assert reports["stacked"] == reports["separate"]
    import pandas as pd

    runs = pd.read_csv(tmp_path / "stacked" / "bench_mcvae_runs.csv")
    assert runs["stacked"].fillna(1).tolist() == [1, 2, 2]  # the timed first run alone, then one stack of two


def test_step_split_names_every_phase(capsys):
    split = load("step_split_mcvae")
    assert split.main(["--config", "mcvae_biked_paper", "--steps", "2", "--repeats", "1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    import re

    phases = dict(re.findall(r"([a-zA-Z +]+?) ([0-9.]+)(?:,|;)", line.split(": ", 1)[1]))
    assert [k.strip() for k in phases] == list(split.PHASES)
    step = float(re.search(r"step ([0-9.]+) ms", line).group(1))
    assert step > 0 and abs(sum(map(float, phases.values())) - step) < 0.01  # the phases add up to the step


def test_compile_probe_compares_both_runs(capsys):
    """benchmarks/compile_mcvae.py small: a ratio per round, the median and the drift of the compiled weights."""
    probe = load("compile_mcvae")
    assert probe.main(["--config", "mcvae_biked_paper", "--rounds", "1", "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    import re

    assert re.search(r"round 1: eager [0-9.]+ ms a step, compiled [0-9.]+ ms: [0-9.]+×", printed)
    drift = float(re.search(r"differ by up to ([0-9.e+-]+)", printed).group(1))
    assert 0 <= drift < 1e-3  # three steps from the same weights, masks and noise: rounding only
    loss = re.search(r"the loss is (\S+) eager and (\S+) compiled", printed)
    assert abs(float(loss.group(1)) - float(loss.group(2))) < 1e-3 * abs(float(loss.group(1)))
