"""The bundled models' benchmark on real pathology: every method's model, measured the same way, each figure kept
with its command in benchmarks/results/real_<cohort>_<method>.json, and the table in docs/BENCHMARKS.md rebuilt
from those files.

    python benchmarks/real_benchmark.py chest --model ra=/work/runs/chest_ra ae=/work/runs/chest_ae ... \\
        --lists /work/runs/real/chest
    python benchmarks/real_benchmark.py brain --model ra=/work/runs/brain_ra ... --lists /work/runs/real/brain \\
        --synthetic /work/runs/sets/brain
    python benchmarks/real_benchmark.py --report-only

Chest (lists of benchmarks/real_data.py): image-level AUROC, AP and FPR at 95% TPR of normal against pneumonia, for
every image score (benchmarks/image_scores.py), on select.csv (where the score is chosen) and test.csv (where it is
reported), per pneumonia kind; the trivial scores beside. Brain: `ra eval` on the multiple sclerosis patient's T1
(pixel AUROC/AP in the brain, Dice, lesion detection at the calibrated 5% and 1% rates) and on the synthetic Colin27
set (benchmarks/brain_set.py), and the raw intensity in its better direction (benchmarks/trivial_pixels.py).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOC = REPO / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- real-benchmark:begin -->", "<!-- real-benchmark:end -->"
PYTHON = sys.executable


def run(command: list[str], log: list) -> None:
    """Runs one command (the figures' provenance), recording it and its time."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    log.append({"command": [Path(c).name if c == PYTHON else c for c in command],
                "seconds": round(time.perf_counter() - start, 1), "returncode": done.returncode})
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")


def chest(method: str, model: str, lists: Path, work: Path) -> dict:
    log, figures = [], {}
    for split in ("select", "test"):
        out = work / f"chest_{method}_{split}.json"
        run([PYTHON, "benchmarks/image_scores.py", "--model", model, "--data", str(lists / f"{split}.csv"),
             "--out", str(out)], log)
        result = json.loads(out.read_text())
        figures[split] = {"normal": result["normal"], "abnormal": result["abnormal"], "figures": result["figures"],
                          "auroc_by_type": result["auroc_by_type"]}
    return {"cohort": "chest", "method": method, "model": model, "figures": figures, "commands": log}


def brain(method: str, model: str, lists: Path, synthetic: Path | None, work: Path) -> dict:
    log, figures = [], {}
    sets = {"ms": lists / "ms.csv", **({"synthetic": synthetic / "test.csv"} if synthetic else {})}
    for name, data in sets.items():
        out = work / f"brain_{method}_{name}"
        run([PYTHON, "-m", "ra_engine.cli", "eval", "--model", model, "--data", str(data), "--out", str(out),
             "--overwrite", "--quiet", "--examples", "4"], log)
        metrics = json.loads((out / "metrics.json").read_text())
        figures[name] = {k: metrics[k] for k in ("counts", "image_level", "pixel_level", "lesion_level", "per_type")}
    return {"cohort": "brain", "method": method, "model": model, "figures": figures, "commands": log}


def trivial(cohort: str, lists: Path, synthetic: Path | None, work: Path, image_size: int) -> dict:
    log, figures = [], {}
    if cohort == "brain":
        for name, data in {"ms": lists / "ms.csv", **({"synthetic": synthetic / "test.csv"} if synthetic else {})}.items():
            out = work / f"trivial_{name}.json"
            run([PYTHON, "benchmarks/trivial_pixels.py", "--data", str(data), "--image-size", str(image_size),
                 "--out", str(out)], log)
            figures[name] = json.loads(out.read_text())["figures"]
    return {"cohort": cohort, "method": "trivial", "figures": figures, "commands": log}


def _f(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def table() -> str:
    """The Markdown tables of every real_*.json."""
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("real_*.json"))]
    lines = []
    chest_rows = [r for r in rows if r["cohort"] == "chest" and r["method"] != "trivial"]
    if chest_rows:
        lines += ["Chest radiographs, normal vs pneumonia (image level; `select` is where the score is chosen, "
                  "`test` where it is reported):", "",
                  "| method | score | select AUROC | test AUROC | test AP | test FPR@95%TPR | test AUROC bacterial "
                  "| test AUROC viral |", "|---|---|---|---|---|---|---|---|"]
        trivial = ("image_mean", "image_sd")  # the same for every model: shown once, in their better direction
        groups = [(r["method"], r, [k for k in r["figures"]["test"]["figures"] if k not in trivial])
                  for r in chest_rows] + [("trivial", chest_rows[0], list(trivial))]
        for method, r, scores in groups:
            by_type = r["figures"]["test"]["auroc_by_type"]
            for score in scores:
                f = r["figures"]["test"]["figures"][score]
                shown = score + (f", {f['direction'].split(' (')[0]}" if "direction" in f else "")
                lines.append(f"| {method} | {shown} | {_f(r['figures']['select']['figures'][score]['auroc'])} | "
                             f"{_f(f['auroc'])} | {_f(f['ap'])} | {_f(f['fpr_at_95_tpr'])} | "
                             f"{_f(by_type.get('bacterial', {}).get(score))} | {_f(by_type.get('viral', {}).get(score))} |")
        lines.append("")
    brain_rows = [r for r in rows if r["cohort"] == "brain"]
    if brain_rows:
        lines += ["Brain T1 (pixel level inside the brain; lesions detected at the calibrated 5% and 1% rates):", "",
                  "| method | set | pixel AUROC | pixel AP | Dice at 5% | lesions detected at 5% | at 1% |",
                  "|---|---|---|---|---|---|---|"]
        for r in brain_rows:
            for name, f in r["figures"].items():
                if r["method"] == "trivial":
                    best = max(f.values(), key=lambda v: v["pixel_auroc"])
                    lines.append(f"| raw intensity (better direction) | {name} | {_f(best['pixel_auroc'])} | "
                                 f"{_f(best['pixel_ap'])} | | | |")
                    continue
                pixel, lesion = f["pixel_level"], f["lesion_level"]
                at = {round(x["flag_rate"], 3): x for x in pixel["at_flag_rate"]}
                rates = {round(x["flag_rate"], 3): x for x in lesion["at_flag_rate"]}
                lines.append(f"| {r['method']} | {name} | {_f(pixel['auroc'])} | {_f(pixel['ap'])} | "
                             f"{_f(at.get(0.05, {}).get('dice'))} | {_f(rates.get(0.05, {}).get('rate'))} | "
                             f"{_f(rates.get(0.01, {}).get('rate'))} |")
        lines.append("")
    return "\n".join(lines)


def write_table() -> None:
    text = DOC.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{table()}\n{END}"
    if BEGIN in text:
        start, end = text.index(BEGIN), text.index(END) + len(END)
        text = text[:start] + block + text[end:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cohort", nargs="?", choices=("chest", "brain"))
    parser.add_argument("--model", nargs="+", default=[], metavar="METHOD=MODEL")
    parser.add_argument("--lists", type=Path)
    parser.add_argument("--synthetic", type=Path, default=None, help="the synthetic brain set (brain only)")
    parser.add_argument("--trivial", action="store_true", help="also the trivial scores")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/real_benchmark"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.report_only:
        args.work.mkdir(parents=True, exist_ok=True)
        for item in args.model:
            method, model = item.split("=", 1)
            result = (chest(method, model, args.lists, args.work) if args.cohort == "chest"
                      else brain(method, model, args.lists, args.synthetic, args.work))
            (RESULTS / f"real_{args.cohort}_{method}.json").write_text(json.dumps(result, indent=1) + "\n")
        if args.trivial:
            result = trivial(args.cohort, args.lists, args.synthetic, args.work, args.image_size)
            (RESULTS / f"real_{args.cohort}_trivial.json").write_text(json.dumps(result, indent=1) + "\n")
    write_table()
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
