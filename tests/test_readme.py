"""Every command in the README's code blocks, run as written from the repository root (with tiny settings
appended), in README order: the README cannot drift from the code.

`COMMANDS` is the maintained list: each README command maps to the flags that make it CI-sized, or to the test
that already runs it (a GPU, the network, or this very suite). A command added to the README without an entry
fails `test_every_readme_command_is_listed`; an entry whose command left the README fails too.
"""
from __future__ import annotations

import importlib
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import BIKED, ROOT

README = ROOT / "README.md"


def readme_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks: continuation lines joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


@dataclass(frozen=True)
class Run:
    """Run the command in-process with `extra` arguments appended (argparse: a later flag wins)."""
    extra: tuple = ()
    needs: tuple = ()  # fixtures of `Context` the command reads (made on first use)
    in_tmp: bool = False  # run in the test's folder, where a file the README's reader writes first lies


@dataclass(frozen=True)
class Covered:
    """Run elsewhere: `test` ('tests/file.py::name') runs it, for the reason given."""
    test: str
    why: str


@dataclass(frozen=True)
class Synopsis:
    """A usage line with placeholders (PATH, N, [..]); its flags must exist on the script."""
    script: str


TINY_MCVAE = ("--max_epochs", "1", "--set", "evaluation.prior_draws=1", "--set", "evaluation.samples_per_design=2",
              "--set", "evaluation.diversity_groups=3", "--set", "evaluation.diversity_samples=2",
              "--set", "evaluation.sparsity_levels=[0.0, 0.5]")
TINY_IMAGES = ("--max_epochs", "1", "--set", "data.image_size=32", "--set", "trainer.batch_size=16",
               "--set", "trainer.num_threads=1", "--set", "evaluation.prior_draws=1",
               "--set", "evaluation.diversity_groups=2", "--set", "evaluation.diversity_samples=2",
               "--set", "evaluation.sparsity_levels=[0.0, 0.5]", "--set", "evaluation.asked_for_rows=0",
               "--set", "sample_grid.n_real=3", "--set", "sample_grid.per_prompt=2")
TINY_CONV = TINY_IMAGES + ("--set", "model.levels=2", "--set", "model.attention_levels=[1]",
                           "--set", "model.start_channels=8", "--set", "model.image_embedding_dim=8",
                           "--set", "model.attention_head_dim=8", "--set", "evaluation.samples_per_design=0")
TINY_FIRST_STAGE = ("--max_epochs", "1", "--set", "data.image_size=32", "--set", "autoencoder.block_out_channels=[8, 16]",
                    "--set", "autoencoder.norm_num_groups=8", "--set", "trainer.num_threads=1",
                    "--set", "sample_grid.n_images=2")
TINY_MCLDM = TINY_IMAGES + ("--set", "unet.start_channels=8", "--set", "unet.attention_levels=[1]",
                            "--set", "unet.attention_heads=2", "--set", "unet.attention_head_dim=8",
                            "--set", "unet.time_embedding_dim=16", "--set", "unet.positional_dim=8",
                            "--set", "diffusion.timesteps=50", "--set", "diffusion.sampling_steps=2",
                            "--set", "evaluation.max_images=4", "--set", "trainer.batch_size=8",
                            "--set", "evaluation.samples_per_design=0")
PARAMETRIC_SLICE = ("--csv_path", "{biked_slice}")
IMAGE_SLICE = ("--csv_path", "{image_slice}", "--images_path", "{image_slice}")

COMMANDS: dict[str, Run | Covered | Synopsis] = {
    "bash setup.sh": Covered("tests/test_datasets.py::test_setup_on_a_clean_clone_fetches_the_data_and_trains_the_cars",
                             ".ci/run runs it before this suite; the test runs it on a clean clone without the shared data"),
    "python train_mcvae.py --cfg_name mcvae_biked": Run(TINY_MCVAE + PARAMETRIC_SLICE, ("biked_slice",)),
    "python -m pytest -q": Covered("tests/test_readme.py::test_every_readme_command_is_listed", "this suite itself"),
    'python sample.py --ckpt logs/mcvae_biked_<timestamp>/checkpoints/last.ckpt --condition BikeStyle=ROAD '
    '--condition "RIM_STYLE rear=disc" --n 8 --out logs/samples/road_bikes.csv --plot logs/samples/road_bikes.png':
        Run(),
    "python -m modules.datasets fetch":
        Covered("tests/test_datasets.py::test_setup_on_a_clean_clone_fetches_the_data_and_trains_the_cars",
                "needs GitHub (or ../shared/data); the test runs it through bash setup.sh on a clean clone, a local "
                "server standing in for GitHub"),
    "python -m modules.datasets fetch cars --from ../Masked_Conditioning":
        Covered("tests/test_datasets.py::test_from_dir_fetches_from_a_copy_of_the_authors_repository",
                "needs a copy of the authors' repository; the test fetches from a folder laid out like it"),
    "python train_mcvae.py --cfg_name mcvae_cars": Run(TINY_MCVAE),
    # my_data.yaml: the README's YAML of "Your own data", written where the command runs (not into the repository)
    "python train_mcvae.py --config my_data.yaml --name trial1": Run(TINY_MCVAE, ("my_data",), in_tmp=True),
    "python sample.py --ckpt PATH --condition NAME=VALUE [--condition ...] --n N --out FILE.csv [--plot FILE.png] "
    "[--seed S]": Synopsis("sample.py"),
    "python sample.py --ckpt PATH --conditions_csv requests.csv --n N --out FILE.csv [--plot FILE.png]":
        Synopsis("sample.py"),
    "python -m modules.render --csv data/biked/df_parameters_final.csv --out data/biked_sketches_256 --size 256":
        Run(("--csv", "{image_slice}", "--size", "32"), ("image_slice",)),
    "python train_conv_mcvae.py --cfg_name conv_mcvae_biked_small": Run(TINY_CONV + IMAGE_SLICE, ("image_slice",)),
    "python train_conv_mcvae.py --cfg_name conv_mcvae_biked --images_path data/biked_sketches_256":
        # the folder the render command above wrote (its conditions.csv: the config's csv_path, moved with it)
        Run(TINY_CONV + ("--csv_path", "{tmp}/data/biked_sketches_256/conditions.csv",
                         "--set", "trainer.accelerator=cpu")),
    'python sample.py --ckpt logs/<run>/checkpoints/last.ckpt --condition "RIM_STYLE rear=disc" --n 16 '
    '--out logs/samples/disc.png': Run(),
    "python train_first_stage.py --cfg_name first_stage_biked_small":
        # --export: a 1-epoch trial does not export by itself; the export goes to the test's folder
        Run(TINY_FIRST_STAGE + IMAGE_SLICE + ("--set", "export_to={tmp}/first_stage", "--export"), ("image_slice",)),
    "python train_mcldm.py --cfg_name mcldm_biked_small":
        Run(TINY_MCLDM + IMAGE_SLICE + ("--set", "first_stage.pretrained={tmp}/first_stage"), ("image_slice",)),
    'python sample.py --ckpt logs/<run>/checkpoints/last.ckpt --condition "RIM_STYLE rear=disc" --n 16 '
    '--out logs/samples/disc.png --cfg_scale 2': Run(("--steps", "2")),
    "python evaluate.py --ckpt logs/<run>/checkpoints/last.ckpt --sampler ddim --steps 50 --cfg_scale 1":
        Run(("--steps", "2", "--out", "{tmp}/eval_ddim")),
    "python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
    "--platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata":
        Covered("tests/test_bench_mcldm.py::test_gpu_check_runs_every_model_on_the_cpu",
                "needs PyPI; the wheels are for the GPU machine, whose check the test runs on the CPU"),
    "bash benchmarks/gpu_check.sh": Covered("tests/test_bench_mcldm.py::test_gpu_check_runs_every_model_on_the_cpu",
                                            "needs a GPU; the test runs the same script on the CPU"),
    "bash benchmarks/gpu_check.sh --device cpu --tiny":
        Covered("tests/test_bench_mcldm.py::test_gpu_check_runs_every_model_on_the_cpu", "that test runs it"),
    "python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 && bash setup.sh":
        Covered("tests/test_readme.py::test_setup_installs_the_pinned_requirements_and_links_the_data",
                "needs a GPU machine and PyTorch's index; the set-up after it is the one tested"),
    "python benchmarks/bench_mcvae.py": Covered("tests/test_bench_mcvae.py::test_bench_mcvae_tables", "a 40-min job"),
    "python benchmarks/bench_mcvae.py --configs mcvae_biked_paper --authors_setup":
        Covered("tests/test_bench_mcvae.py::test_bench_mcvae_tables", "a long job; the test runs the script small"),
    "python benchmarks/tradeoff_mcvae.py": Covered("tests/test_bench_mcvae.py::test_tradeoff_curve", "a long job"),
    "python benchmarks/bench_mcvae_speed.py": Covered("tests/test_bench_mcvae.py::test_speed_benchmark_reports_the_ratio",
                                                      "minutes of timing"),
    "python benchmarks/bench_mcvae_speed.py --authors ../Masked_Conditioning": Covered(
        "tests/test_bench_mcvae.py::test_the_authors_loop_runs_their_definitions_alone_on_our_split",
        "needs a copy of the authors' repository; the test runs a stand-in with their interface"),
    "python -m experiments.sweep sparsity --out experiments/results/sparsity_schedules --workers 2 --initials 0.0 0.1 "
    "--targets 0.2 0.3 0.5 --seeds 0 --fast_eval":
        Covered("tests/test_experiments.py::test_sweep_runs_resumes_and_recomputes",
                "it rewrites the committed results; the test runs the same sweep small"),
    "python -m experiments.sweep sparsity --out experiments/results/sparsity_schedules_stacked --workers 2 "
    "--initials 0.0 0.1 --targets 0.2 0.3 0.5 --seeds 0 --fast_eval --stack":
        Covered("tests/test_stacked.py::test_the_sweep_stacks_cells_per_architecture_and_resumes",
                "it rewrites the committed results; the test runs a stacked sweep small"),
    "python -m experiments.sweep dataset_size --out experiments/results/dataset_size --workers 2 --fractions 0.1 0.25 "
    "0.5 1.0 --seeds 0 1": Covered("tests/test_experiments.py::test_cli_dataset_size_and_hparams",
                                   "it rewrites the committed results"),
    "python -m experiments.sweep hparams --out logs/hp --grid model.kl_weight=0.5,0.7,0.9 --grid model.latent_dim=6,10":
        Covered("tests/test_experiments.py::test_cli_dataset_size_and_hparams", "12 trainings"),
    "mkdir -p logs/notebooks && papermill _notebooks/biked_analysis.ipynb logs/notebooks/biked_analysis.ipynb "
    "-p max_rows 500":
        Covered("tests/test_notebooks.py::test_readme_command_from_the_repository_root",
                "the notebook test runs this very text from the repository root (a Jupyter kernel, ≈ 25 s)"),
}


def test_every_readme_command_is_listed():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    missing = [c for c in commands if c not in COMMANDS]
    assert not missing, f"README commands without an entry in tests/test_readme.py COMMANDS: {missing}"
    stale = [c for c in COMMANDS if c not in commands]
    assert not stale, f"COMMANDS entries no longer in the README: {stale}"


@pytest.mark.parametrize("command", [c for c, how in COMMANDS.items() if isinstance(how, Covered)])
def test_covered_commands_name_a_test_that_exists(command):
    path, name = COMMANDS[command].test.split("::")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    assert callable(getattr(module, name, None)), f"{command!r} is said to be run by {path}::{name}, which is gone"


@pytest.mark.parametrize("command", [c for c, how in COMMANDS.items() if isinstance(how, Synopsis)])
def test_synopses_use_flags_the_script_has(command):
    script = COMMANDS[command].script
    module = importlib.import_module(script.removesuffix(".py"))
    source = Path(module.__file__).read_text() + (ROOT / "modules" / "sampling_cli.py").read_text()
    for flag in re.findall(r"(--[a-z_]+)", command):
        assert f'"{flag}"' in source, f"{script} has no flag {flag} (README: {command})"


def test_setup_installs_the_pinned_requirements_and_links_the_data():
    setup = (ROOT / "setup.sh").read_text()
    assert "pip install -q -r requirements.txt" in setup and "../shared/data/$name" in setup
    assert "bash setup.sh" in (ROOT / ".ci" / "run").read_text()
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("python -m pytest -q")  # exactly the README's command
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["torch"] == "2.13.0"
    assert "torchvision" not in pins


# --------------------------------------------------------------------------- running the commands in order


@dataclass
class Context:
    tmp: Path
    made: dict = field(default_factory=dict)
    runs: dict = field(default_factory=dict)  # config name → run directory
    last_run: Path | None = None

    def fixture(self, name: str) -> str:
        if name not in self.made:
            self.made[name] = getattr(self, f"_make_{name}")()
        return str(self.made[name])

    def _make_biked_slice(self) -> Path:
        path = self.tmp / "biked_slice.csv"
        pd.read_csv(BIKED).head(400).to_csv(path, index=False)
        return path

    def _make_image_slice(self) -> Path:
        path = self.tmp / "image_slice.csv"
        pd.read_csv(BIKED).head(48).to_csv(path, index=False)
        return path

    def _make_my_data(self) -> Path:
        """The YAML of the README's "Your own data", over a CSV with its columns (the README's own file name)."""
        text = README.read_text(encoding="utf-8")
        section = text[text.index("## Your own data"):text.index("## Config reference")]
        raw = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
        import numpy as np

        rng = np.random.default_rng(0)
        n = 240
        frame = pd.DataFrame({c: rng.normal(size=n) for c in raw["data"]["design_columns"]})
        frame.insert(0, raw["data"]["id_column"], [f"p{i}" for i in range(n)])
        frame["material"] = rng.choice(["steel", "alu", "wood"], n)
        frame["size"] = rng.choice(["S", "M", "L"], n)
        frame["coating"] = rng.choice([0, 1], n)
        frame["tag1"], frame["tag2"] = rng.choice(["light", "stiff", "cheap"], (2, n))
        frame["max_load"] = rng.uniform(1, 9, n)
        csv = self.tmp / "my_parts.csv"
        frame.to_csv(csv, index=False)
        raw["data"]["csv_path"] = str(csv)
        path = self.tmp / "my_data.yaml"  # the README passes it relative to the working directory
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path


def _argv(command: str, how: Run, ctx: Context) -> list[str]:
    tokens = shlex.split(command)
    for name in how.needs:
        ctx.fixture(name)
    out = []
    for token in tokens:
        if "<timestamp>" in token or "<run>" in token:  # the run the README's previous training made
            run = ctx.runs.get(token.split("/")[1].split("_<timestamp>")[0]) if "<timestamp>" in token else None
            token = str(run or ctx.last_run) + token.split(">", 1)[1]
        elif token.startswith("logs/"):
            token = str(ctx.tmp / token)
        elif token.startswith("data/biked_sketches"):  # the render's output: into the test's folder
            token = str(ctx.tmp / token)
        out.append(token)
    out += [a.format(tmp=ctx.tmp, **{k: str(v) for k, v in ctx.made.items()}) for a in how.extra]
    if re.match(r"python train_\w+\.py", command):
        out += ["--logdir", str(ctx.tmp / "logs")]
    return out


def _main_of(tokens: list[str]):
    if tokens[1] == "-m":
        return importlib.import_module(tokens[2]).main, tokens[3:]
    return importlib.import_module(tokens[1].removesuffix(".py")).main, tokens[2:]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return Context(tmp_path_factory.mktemp("readme"))


@pytest.mark.parametrize("command", [c for c in readme_commands(README.read_text(encoding="utf-8"))
                                     if isinstance(COMMANDS.get(c), Run)])
def test_readme_command_runs(command, ctx, monkeypatch, capsys):
    how = COMMANDS[command]
    monkeypatch.chdir(ctx.tmp if how.in_tmp else ROOT)  # "from the repository root"
    monkeypatch.setenv("WANDB_MODE", "offline")
    tokens = _argv(command, how, ctx)
    main, argv = _main_of(tokens)
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, f"{command}\n→ {shlex.join(tokens)}\n{captured.err[-3000:]}"
    if "train_" in tokens[1]:
        run = Path(re.findall(r"run directory: (\S+)", captured.out)[-1])
        assert (run / "checkpoints" / "last.ckpt").is_file()
        ctx.last_run = run
        name = next((t for t in (tokens[tokens.index("--cfg_name") + 1] if "--cfg_name" in tokens else None,) if t),
                    None)
        ctx.runs[name or "trial1"] = run
    outs = [tokens[i + 1] for i, t in enumerate(tokens) if t == "--out"]
    if outs:
        assert Path(outs[-1]).exists(), outs[-1]
