"""One GPU check, ready to run: every model trains a few steps and draws a sample grid on the device, then
`bench_mcldm.py` times the paper UNet (the authors' settings, eager, compiled) in one process.

    bash benchmarks/gpu_check.sh                       # on a GPU machine: installs .whl/*.whl first
    bash benchmarks/gpu_check.sh --device cpu --tiny   # the same on the CPU, small and quick (CI)

Steps (each one is a subprocess with a time limit; a failure is recorded and the next step still runs):
1. a subset of BIKED (`--designs` rows of data/biked/df_parameters_final.csv) in a work folder;
2. mcVAE (`mcvae_biked`), one epoch, then `sample.py` with a bike picture;
3. conv-mcVAE (`conv_mcvae_biked_small`), one epoch, with its sample grid; then the paper config
   (`conv_mcvae_biked`, 256 px, batch 140: 2 optimizer steps on 512 designs) one epoch (with `--tiny`: at 64 px,
   batch 32);
4. first stage (`first_stage_biked_small`), one epoch, exported inside the work folder (the shared export in
   data/first_stages is left alone);
5. mcLDM (`mcldm_biked_small`) on that first stage, one epoch, with its sample grid, then `sample.py` with the
   DPM-Solver++;
6. `benchmarks/bench_mcldm.py --variants authors,eager,compile` on configs/mcldm_biked.yaml (with `--tiny`: the
   small UNet on the CPU, authors and eager only).

Everything the device machine returns lies in `--out` (at most 8 files): `gpu_check.json` (per step: status,
seconds, the tail of its output; the benchmark's report), `bench_mcldm.json`, and the PNGs of steps 2–5.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "biked" / "df_parameters_final.csv"


def write_config(name: str, work: Path, edit) -> Path:
    """configs/<name>.yaml with `edit(config)` applied, written to the work folder."""
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    edit(config)
    path = work / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


class Steps:
    def __init__(self, out: Path, timeout: float):
        self.out, self.timeout, self.results = out, timeout, []
        self.started = time.perf_counter()

    def run(self, name: str, command: list[str], *, timeout: float | None = None) -> bool:
        print(f"\n=== {name}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout or self.timeout)
            ok, output = done.returncode == 0, done.stdout + done.stderr
            status = "ok" if ok else f"exit {done.returncode}"
        except subprocess.TimeoutExpired as err:
            ok, status = False, f"timed out after {err.timeout:.0f} s"
            output = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
        seconds = time.perf_counter() - start
        tail = "\n".join(line for line in output.replace("\r", "\n").splitlines()
                         if line.strip() and "it/s]" not in line and "s/it]" not in line)[-3000:]
        print(tail[-1500:], flush=True)
        print(f"=== {name}: {status} in {seconds:.1f} s", flush=True)
        self.results.append({"step": name, "status": status, "seconds": round(seconds, 1), "output_tail": tail})
        return ok

    def keep(self, source: Path | None, name: str) -> None:
        """Copy a picture to --out (what the device machine returns)."""
        if source is not None and source.is_file():
            shutil.copyfile(source, self.out / name)


def newest(pattern: str, folder: Path) -> Path | None:
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="fewer designs and a small benchmark (CPU / CI)")
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/gpu_check",
                   help="JSON and PNGs (default: $OUT, else benchmarks/results/gpu_check)")
    p.add_argument("--work", help="runs and data subset (default: a folder beside --out, removed first)")
    p.add_argument("--designs", type=int, help="BIKED rows used for training (default 512; --tiny 128)")
    p.add_argument("--step_timeout", type=float, default=240.0, help="seconds per training step")
    args = p.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA GPU here; run with --device cpu --tiny")
    if not DATA.is_file():
        p.error(f"{DATA} is missing: run `bash setup.sh` (it links ../shared/data) or place the BIKED CSV there")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else out.parent / f"{out.name}_work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    designs = args.designs or (128 if args.tiny else 512)
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    py = sys.executable
    steps = Steps(out, args.step_timeout)

    import pandas as pd

    subset = work / "biked_subset.csv"
    pd.read_csv(DATA).head(designs).to_csv(subset, index=False)

    def common(config: dict, *, images: bool) -> None:
        config["data"]["csv_path"] = str(subset)
        if images:
            config["data"]["images_path"] = str(subset)
        t = config.setdefault("trainer", {})
        t.update(max_epochs=1, accelerator=accelerator, devices=1, check_val_every_n_epoch=1)
        if args.device == "cuda":
            t.pop("num_threads", None)
        if "sample_grid" in config:
            config["sample_grid"]["every_n_epochs"] = 1

    # 2. mcVAE
    mcvae = write_config("mcvae_biked", work, lambda c: common(c, images=False))
    if steps.run("mcvae_train", [py, "train_mcvae.py", "--config", str(mcvae), "--logdir", str(work / "runs"),
                                 "--name", "mcvae", "--no_eval"]):
        run = newest("mcvae_*", work / "runs")
        steps.run("mcvae_sample", [py, "sample.py", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--n", "8",
                                   "--condition", "BikeStyle=ROAD", "--out", str(work / "mcvae_samples.csv"),
                                   "--plot", str(out / "mcvae_samples.png"), "--device", args.device])

    # 3. conv-mcVAE (small)
    def conv(c):
        common(c, images=True)
        if args.tiny:
            c["trainer"]["batch_size"] = 32
    conv_cfg = write_config("conv_mcvae_biked_small", work, conv)
    if steps.run("conv_mcvae_train", [py, "train_conv_mcvae.py", "--config", str(conv_cfg), "--logdir",
                                      str(work / "runs"), "--name", "conv", "--no_eval"]):
        steps.keep(newest("samples/epoch_*.png", newest("conv_*", work / "runs")), "conv_mcvae_grid.png")

    def conv_paper(c):
        common(c, images=True)
        c["sample_grid"]["every_n_epochs"] = 0
        if args.tiny:
            c["data"]["image_size"] = 64
            c["trainer"]["batch_size"] = 32
    conv_paper_cfg = write_config("conv_mcvae_biked", work, conv_paper)
    steps.run("conv_mcvae_paper_train", [py, "train_conv_mcvae.py", "--config", str(conv_paper_cfg), "--logdir",
                                         str(work / "runs"), "--name", "conv_paper", "--no_eval"])

    # 4. first stage (small), exported inside the work folder
    def first(c):
        common(c, images=True)
        c["export_to"] = None
    first_cfg = write_config("first_stage_biked_small", work, first)
    exported = None
    if steps.run("first_stage_train", [py, "train_first_stage.py", "--config", str(first_cfg), "--logdir",
                                       str(work / "runs"), "--name", "first_stage"]):
        run = newest("first_stage_*", work / "runs")
        exported = run / "first_stage"
        steps.keep(run / "eval" / "reconstructions.png", "first_stage_reconstructions.png")

    # 5. mcLDM (small) on that first stage
    if exported is not None and (exported / "config.json").is_file():
        def ldm(c):
            common(c, images=True)
            c["first_stage"] = {"pretrained": str(exported), "subfolder": None}
            c["evaluation"]["max_images"] = 32
        ldm_cfg = write_config("mcldm_biked_small", work, ldm)
        if steps.run("mcldm_train", [py, "train_mcldm.py", "--config", str(ldm_cfg), "--logdir", str(work / "runs"),
                                     "--name", "mcldm", "--no_eval"]):
            run = newest("mcldm_*", work / "runs")
            steps.keep(newest("samples/epoch_*.png", run), "mcldm_grid.png")
            steps.run("mcldm_sample", [py, "sample.py", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--n", "8",
                                       "--condition", "BikeStyle=ROAD", "--sampler", "dpm_solver",
                                       "--steps", "5" if args.tiny else "15",
                                       "--out", str(out / "mcldm_samples.png"), "--device", args.device])

    # 6. the benchmark of the paper UNet
    bench = [py, "benchmarks/bench_mcldm.py", "--json", str(out / "bench_mcldm.json"), "--device", args.device]
    if args.tiny:
        bench += ["--tiny", "--variants", "authors,eager", "--max_sampling_steps", "3", "--images", "2"]
    else:
        bench += ["--variants", "authors,eager,compile"]
    steps.run("bench_mcldm", bench, timeout=None if not args.tiny else args.step_timeout)

    report = {"device": args.device, "tiny": args.tiny, "designs": designs, "steps": steps.results,
              "seconds": round(time.perf_counter() - steps.started, 1)}
    bench_json = out / "bench_mcldm.json"
    if bench_json.is_file():
        report["bench_mcldm"] = json.loads(bench_json.read_text())
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    failed = [r["step"] for r in steps.results if r["status"] != "ok"]
    print(f"\ngpu_check: {len(steps.results) - len(failed)}/{len(steps.results)} steps ok in {report['seconds']} s"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; report {out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
