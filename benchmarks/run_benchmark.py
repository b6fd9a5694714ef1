"""The real-anatomy benchmark end to end: build the sets, train every method and seed, calibrate, evaluate, keep a
small JSON per part under benchmarks/results/, and rebuild the table in docs/BENCHMARKS.md from those files.

    python benchmarks/run_benchmark.py --budget smoke --sets brain chest --seeds 0 1 2 --work runs/benchmark
    python benchmarks/run_benchmark.py --report-only       # the table again from benchmarks/results/

A part = one set x one method x one seed. Parts whose result file exists are skipped, so a budget can be run over
several sessions (training itself resumes exactly with `ra train --resume`). Every command run is recorded in the
part's JSON. Methods: ra (the method), sivae, vae, ae (baselines: same data, image size, iterations); ra is also
evaluated with the L1-only score ("ra-l1", the ablation of the full L1 x LPIPS x CLAHE score), and with the last
iteration's weights instead of the best validation epoch's ("ra-last", `ra train --select last`: the same training,
so it starts from the finished ra part's final checkpoint when there is one).
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOC = REPO / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- benchmark-table:begin -->", "<!-- benchmark-table:end -->"
METHODS = ("ra", "sivae", "vae", "ae", "ra-last")
# Parts that train a method with other options: name -> (method trained, extra `ra train` options).
VARIANTS = {"ra-last": ("ra", ["--select", "last"])}
SETS = {
    # name: (builder script, builder options (each builder's own default seed), ra train preset)
    "brain": ("benchmarks/brain_set.py", ["--per-type", "3", "--overwrite"], "brain-mri"),
    "chest": ("benchmarks/chest_set.py", [], "xray"),
}
# Training options of each budget (the same for every method and set). smoke: a reduced size and length that finishes
# on a 2-core CPU (each part well under 10 minutes), with batch-statistics BatchNorm; not a quality claim.
# smoke-bn-reference: the same with BatchNorm in the paper's reference mode (a learned scale and shift), which RA
# trains with by default; at this size every brain model collapses to a black output in that mode (see
# docs/BENCHMARKS.md), so it is run on the chest set. paper: docs/METHOD.md's configuration and schedule.
SMOKE = ["--image-size", "64", "--widths", "16,32,64,128", "--latent-dim", "64", "--lr", "2e-4", "--max-steps", "400",
         "--epochs", "100000", "--patience", "100000", "--checkpoint-every", "0"]
SMOKE_DESCRIPTION = "64x64, widths 16-32-64-128, latent 64, lr 2e-4, 400 iterations of batch 8"
BUDGETS = {
    "smoke": {"options": [*SMOKE, "--batchnorm", "batch"],
              "describe": f"{SMOKE_DESCRIPTION}, batch-statistics BatchNorm"},
    "smoke-bn-reference": {"options": [*SMOKE, "--batchnorm", "reference"],
                           "describe": f"{SMOKE_DESCRIPTION}, BatchNorm in the paper's reference mode"},
    "paper": {"options": [], "describe": "docs/METHOD.md: 128x128, widths 64-128-256-512-512, latent 128, lr 5e-5, up to "
                                         "1500 epochs with early stopping (patience 500)"},
}
FLAG_RATES = ("0.05", "0.01")


def ra_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ra_engine.cli", *args]


def run(command: list[str], log: list[dict]) -> float:
    """Runs `command` (output shown), appends it to `log`, returns its wall time; raises on failure."""
    print("+", shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    seconds = time.perf_counter() - start
    log.append({"command": shlex.join(command), "seconds": round(seconds, 1)})
    return seconds


def build_set(name: str, work: Path) -> Path:
    script, options, _ = SETS[name]
    folder = work / "sets" / name
    if not (folder / "test.csv").is_file():
        run([sys.executable, script, "--out", str(folder), *options], [])
    return folder


def summary(metrics: dict) -> dict:
    """The figures the table needs from `ra eval`'s metrics.json (the per-scan rows are left out)."""
    pixel, lesion, image = metrics["pixel_level"], metrics["lesion_level"], metrics["image_level"]
    return {
        "counts": metrics["counts"],
        "thresholds": metrics["thresholds"],
        "pixel": {"auroc": pixel["auroc"], "ap": pixel["ap"], "per_scan": pixel["per_scan"],
                  "best_dice_upper_bound": pixel["best_dice"]["dice"],
                  "at_flag_rate": [{k: r[k] for k in ("flag_rate", "threshold", "dice", "sensitivity",
                                                      "healthy_flagged_fraction")} for r in pixel["at_flag_rate"]]},
        "lesion": {"at_flag_rate": lesion["at_flag_rate"], "lesions": lesion["lesions"]},
        "image": image,
        "per_type": metrics["per_type"],
    }


def run_part(set_name: str, folder: Path, method: str, seed: int, budget: str, work: Path) -> list[Path]:
    """Trains, calibrates and evaluates one part; returns the result files written."""
    preset = SETS[set_name][2]
    run_dir = work / "runs" / budget / set_name / f"{method}-s{seed}"
    log: list[dict] = []
    model = run_dir / "model"
    trained, options = VARIANTS.get(method, (method, []))
    if not (model / "model.json").is_file():
        if method in VARIANTS:
            options = [*options, *_start_from_twin(run_dir, run_dir.parent / f"{trained}-s{seed}", log)]
        resume = ["--resume"] if (run_dir / "checkpoints" / "latest.pt").is_file() else ["--overwrite"]
        run(ra_command("train", "--data", str(folder / "train.csv"), "--preset", preset, "--out", str(run_dir),
                       "--method", trained, "--seed", str(seed), "--no-calibrate", "--quiet",
                       *BUDGETS[budget]["options"], *options, *resume), log)
    train_card = json.loads((model / "model.json").read_text())
    run(ra_command("calibrate", "--model", str(model), "--data", str(folder / "calibration.csv"), "--quiet"), log)
    written = []
    for score in (("full", "l1") if method == "ra" else ("full",)):
        name = method if score == "full" else f"{method}-{score}"
        out = run_dir / f"eval-{score}"
        extra = ["--calibration-data", str(folder / "calibration.csv")] if score != "full" else []
        run(ra_command("eval", "--model", str(model), "--data", str(folder / "test.csv"), "--out", str(out),
                       "--score", score, "--flag-rates", *FLAG_RATES, "--examples", "4", "--overwrite", "--quiet",
                       *extra), log)
        metrics = json.loads((out / "metrics.json").read_text())
        result = {
            "set": set_name, "method": name, "seed": seed, "budget": budget,
            "budget_description": BUDGETS[budget]["describe"],
            "iterations": train_card.training.steps,
            "training": {**{k: train_card.training.get(k) for k in ("steps", "epochs", "weights_from",
                                                                      "weights_step", "stopped_by")},
                         "seconds": next((c["seconds"] for c in log if " train " in c["command"]), None)},
            "model_sha256": train_card.weights_sha256,
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
            "commands": log,
            **summary(metrics),
        }
        path = RESULTS / f"bench_{budget}_{set_name}_{name}_s{seed}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        written.append(path)
    return written


def _start_from_twin(run_dir: Path, twin: Path, log: list[dict]) -> list[str]:
    """A variant trains exactly as its twin part (same method, seed, data and schedule; training is bitwise
    reproducible and resumes exactly), so when the twin has finished, its final checkpoint is copied in and the
    variant's `ra train --resume` only writes the model. Returns the options that share the twin's slice cache."""
    latest = run_dir / "checkpoints" / "latest.pt"
    if (twin / "model" / "model.json").is_file() and not latest.is_file():
        latest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(twin / "checkpoints" / "latest.pt", latest)
        log.append({"command": f"copy {twin / 'checkpoints' / 'latest.pt'} {latest}", "seconds": 0.0})
    return ["--cache-dir", str(twin / "cache")]


def figures(budget: str, work: Path, seed: int = 0) -> list[Path]:
    """Copies a few of `ra eval`'s plots of RA (seed `seed`) into docs/images/benchmark/, downscaled, and runs RA on
    the chest set's qualitative cases (the real RG1_UNCI.dcm); returns the files written."""
    from PIL import Image as Picture

    target = REPO / "docs" / "images" / "benchmark"
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for set_name in SETS:
        run_dir = work / "runs" / budget / set_name / f"ra-s{seed}"
        for plot in ("examples", "per_type"):
            source = run_dir / "eval-full" / f"{plot}.png"
            if source.is_file():
                picture = Picture.open(source)
                picture.thumbnail((900, 900))
                written.append(target / f"{budget}_{set_name}_ra_{plot}.png")
                picture.save(written[-1], optimize=True)
    qualitative = work / "sets" / "chest" / "qualitative.csv"
    model = work / "runs" / budget / "chest" / f"ra-s{seed}" / "model"
    if qualitative.is_file() and (model / "model.json").is_file():
        out = work / "runs" / budget / "chest" / f"ra-s{seed}" / "qualitative"
        run(ra_command("detect", str(qualitative), "--model", str(model), "--out", str(out), "--overwrite",
                       "--quiet"), [])
        for overlay in sorted(out.glob("*_overlay.png")):
            picture = Picture.open(overlay)
            picture.thumbnail((700, 700))
            written.append(target / f"{budget}_chest_ra_qualitative_{overlay.name}")
            picture.save(written[-1], optimize=True)
    return written


def _mean_sd(values: list[float | None]) -> str:
    import numpy as np

    kept = [v for v in values if v is not None]
    if not kept:
        return "undefined"
    if len(kept) == 1:
        return f"{kept[0]:.3f}"
    return f"{np.mean(kept):.3f} ± {np.std(kept, ddof=1):.3f}"


def _at(rows: list[dict], rate: float, key: str):
    return next((r.get(key) for r in rows if abs(r["flag_rate"] - rate) < 1e-9), None)


def report() -> str:
    """The Markdown table (mean ± sd over seeds) of every result file, by budget and set."""
    parts = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("bench_*_*_*_s*.json"))]
    if not parts:
        return "No benchmark results yet (`python benchmarks/run_benchmark.py`)."
    lines = []
    order = {m: i for i, m in enumerate(("ra", "ra-l1", "ra-last", "sivae", "vae", "ae"))}
    for budget in sorted({p["budget"] for p in parts}, key=lambda b: list(BUDGETS).index(b)):
        for set_name in sorted({p["set"] for p in parts if p["budget"] == budget}):
            group = [p for p in parts if p["budget"] == budget and p["set"] == set_name]
            first = group[0]
            sources = sorted({f"{p['method']}: {p['thresholds']['source']}" for p in group})
            lines += [f"#### {set_name}, budget `{budget}`: {first['budget_description']}", "",
                      f"Test scans: {first['counts']['scans']} ({first['counts']['abnormal']} abnormal, "
                      f"{first['counts']['normal']} normal), {first['lesion']['lesions']} lesions. Thresholds "
                      f"({'; '.join(sources)}). Mean ± sd over seeds. Pooled pixel figures are dominated by the "
                      f"types with the largest masks: read them with the per-type table.", "",
                      "| method | seeds | iterations | weights from iteration | pixel AUROC | pixel AP | Dice @5% | Dice @1% | best Dice (upper bound) "
                      "| lesions detected @5% | @1% | image AUROC | image AP | FPR @95% TPR |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for method in sorted({p["method"] for p in group}, key=lambda m: order.get(m, 99)):
                runs = [p for p in group if p["method"] == method]
                col = lambda f: _mean_sd([f(p) for p in runs])
                lines.append("| " + " | ".join([
                    method, ",".join(str(p["seed"]) for p in runs),
                    ",".join(sorted({str(p["iterations"]) for p in runs})),
                    ",".join(str(p["training"].get("weights_step")) for p in runs),
                    col(lambda p: p["pixel"]["auroc"]), col(lambda p: p["pixel"]["ap"]),
                    col(lambda p: _at(p["pixel"]["at_flag_rate"], 0.05, "dice")),
                    col(lambda p: _at(p["pixel"]["at_flag_rate"], 0.01, "dice")),
                    col(lambda p: p["pixel"]["best_dice_upper_bound"]),
                    col(lambda p: _at(p["lesion"]["at_flag_rate"], 0.05, "rate")),
                    col(lambda p: _at(p["lesion"]["at_flag_rate"], 0.01, "rate")),
                    col(lambda p: p["image"]["auroc"]), col(lambda p: p["image"]["ap"]),
                    col(lambda p: p["image"]["fpr_at_95_tpr"])]) + " |")
            types = sorted({t for p in group for t in p["per_type"]})
            if types:
                lines += ["", f"Per anomaly type ({set_name}, `{budget}`): pixel AUROC / pixel AP / share of lesions "
                              "detected at the 5% flag rate, mean over seeds.", "",
                          "| method | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
                for method in sorted({p["method"] for p in group}, key=lambda m: order.get(m, 99)):
                    runs = [p for p in group if p["method"] == method]
                    cells = []
                    for kind in types:
                        figure = lambda f: _mean_sd([f(p["per_type"].get(kind) or {}) for p in runs]).split(" ±")[0]
                        cells.append(" / ".join((figure(lambda e: e.get("pixel_auroc")),
                                                 figure(lambda e: e.get("pixel_ap")),
                                                 figure(lambda e: _at(e.get("detection_rate") or [], 0.05, "rate")))))
                    lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def write_report() -> None:
    text = DOC.read_text()
    if BEGIN not in text:
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} block to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{report()}\n{END}{tail}")
    print(f"table written to {DOC}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=tuple(BUDGETS), default="smoke")
    parser.add_argument("--sets", nargs="+", choices=tuple(SETS), default=list(SETS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "benchmark", help="sets, runs and evaluations")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table from benchmarks/results")
    parser.add_argument("--figures", action="store_true", help="also copy RA's plots (seed 0) into docs/images and "
                                                                "run it on the chest set's real radiograph")
    args = parser.parse_args(argv)
    if not args.report_only:
        RESULTS.mkdir(parents=True, exist_ok=True)
        folders = {set_name: build_set(set_name, args.work) for set_name in args.sets}
        for seed in args.seeds:  # seed by seed, so that a budget cut short still covers every set and method
            for set_name, folder in folders.items():
                for method in args.methods:
                    if (RESULTS / f"bench_{args.budget}_{set_name}_{method}_s{seed}.json").is_file():
                        print(f"= {set_name} {method} seed {seed}: result exists, skipped", flush=True)
                        continue
                    run_part(set_name, folder, method, seed, args.budget, args.work)
                    write_report()
    if args.figures:
        for path in figures(args.budget, args.work):
            print(f"figure {path.relative_to(REPO)}")
    write_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
