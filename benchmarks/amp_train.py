"""bfloat16 autocast in CPU training against float32: the same RA run (same seed, data, options and iterations)
trained twice with `ra train`, once with `--amp` and once without, on a normal cohort. Reports each loss term's mean
over windows of iterations for both runs, their relative difference, the validation reconstruction error of each
epoch, and the seconds per iteration.

    OMP_NUM_THREADS=1 python benchmarks/amp_train.py --data /work/runs/real/chest/train.csv \\
        --val-data /work/runs/real/chest/val.csv --preset xray --steps 300 --work /tmp/amp_train

The two runs share one slice cache (the first builds it; --cache-dir names an existing one). The JSON goes to
benchmarks/results/amp_train.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RA = [sys.executable, "-m", "ra_engine.cli"]


def train(args, amp: bool) -> Path:
    """Runs one training; returns its run folder (kept when it exists already, so a finished run is not redone)."""
    out = args.work / ("amp" if amp else "float32")
    if (out / "model" / "model.json").is_file():
        return out
    command = [*RA, "train", "--data", args.data, "--preset", args.preset, "--image-size", str(args.image_size),
               "--widths", args.widths, "--latent-dim", str(args.latent_dim), "--lr", str(args.lr),
               "--batchnorm", args.batchnorm, "--max-steps", str(args.steps), "--epochs", "100000",
               "--patience", "100000", "--seed", str(args.seed), "--out", str(out), "--overwrite", "--quiet",
               "--cache-dir", str(args.cache_dir or args.work / "cache"),
               "--progress-json", str(out.with_suffix(".jsonl"))]
    command += ["--val-data", args.val_data] if args.val_data else []
    command += ["--amp"] if amp else []
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return out


def losses(run: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every iteration's loss terms and the wall-clock time between iterations, from the run's progress JSON."""
    steps = [e for e in map(json.loads, run.with_suffix(".jsonl").read_text(encoding="utf-8").splitlines())
             if e["event"] == "step" and "losses" in e]
    terms = {k: np.array([e["losses"][k] for e in steps]) for k in steps[0]["losses"]}
    return terms, np.diff([e["time"] for e in steps])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--val-data", default=None)
    parser.add_argument("--preset", default="xray")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=50, help="iterations per averaged window")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--widths", default="32,64,128,256")
    parser.add_argument("--latent-dim", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batchnorm", default="reference")
    parser.add_argument("--seed", type=int, default=2109)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/amp_train"))
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="the slice cache (default: one in --work; a training run's cache on the same data works)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "amp_train.json")
    args = parser.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    runs = {"float32": train(args, amp=False), "amp": train(args, amp=True)}
    curves = {name: losses(run) for name, run in runs.items()}
    windows = range(0, args.steps, args.window)
    table = {}
    for term in curves["float32"][0]:
        rows = []
        for start in windows:
            f32, amp = (float(np.mean(curves[n][0][term][start:start + args.window])) for n in ("float32", "amp"))
            rows.append({"iterations": [start + 1, min(start + args.window, args.steps)], "float32": f32, "amp": amp,
                         "relative_difference": (amp - f32) / abs(f32) if f32 else None})
        table[term] = rows
    history = {name: json.loads((run / "model" / "model.json").read_text(encoding="utf-8"))["training"]["history"]
               for name, run in runs.items()}
    result = {"command": " ".join(["python", "benchmarks/amp_train.py", *(argv or sys.argv[1:])]),
              "steps": args.steps, "window": args.window, "losses": table,
              "validation": {name: [{"epoch": h["epoch"], "val_loss": h.get("val_loss")} for h in rows]
                             for name, rows in history.items()},
              "seconds_per_iteration": {name: float(np.median(curves[name][1])) for name in runs}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"{'term':<14}" + "".join(f"  it {r['iterations'][0]}-{r['iterations'][1]}: f32 / amp"
                                    for r in table["loss_e"]))
    for term, rows in table.items():
        print(f"{term:<14}" + "".join(f"  {r['float32']:10.4g} / {r['amp']:<10.4g}" for r in rows))
    for name, rows in result["validation"].items():
        print(f"validation {name}: " + ", ".join(f"epoch {r['epoch']} {r['val_loss']:.5f}" for r in rows))
    print("seconds per iteration: " + ", ".join(f"{k} {v:.2f}" for k, v in result["seconds_per_iteration"].items()))


if __name__ == "__main__":
    main()
