"""`ra eval`: evaluate a model on a labelled test set (image, pixel and lesion level) and write the figures.

The test set is a CSV with the columns image, mask (optional: the lesion mask on the image's grid), label
(optional: 0 normal, 1 abnormal; without it, a scan is abnormal when its mask marks a lesion) and type (optional:
the anomaly type, for per-type figures). Writes into --out: metrics.json (every figure, the model card's name and
weights sha256, the score kind, flag rates and thresholds, counts, the command), metrics.md (the same as tables),
pixel_curves.png and image_curves.png (ROC and precision-recall), per_type.png (lesion detection rate and AP per
anomaly type) and examples.png (input, pseudo-healthy, anomaly map, detections, truth of up to --examples scans).
Definitions: ra_engine/evaluation.py. Research use only, not for diagnosis.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

from .cli_args import add_device_option, add_progress_options, flag_rate, positive, stop_on_signals
from .errors import RAError

OUTPUTS = ("metrics.json", "metrics.md", "pixel_curves.png", "image_curves.png", "per_type.png", "examples.png")


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def add_eval_parser(sub) -> None:
    from .evaluation import DEFAULT_FLAG_RATES

    p = sub.add_parser("eval", help="evaluate a model on a labelled test set (image, pixel and lesion level)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR_OR_NAME",
                   help="a model directory or the name of a registered model (`ra models list`)")
    p.add_argument("--data", required=True, metavar="TEST",
                   help="the test set: a CSV with columns image[,mask,label,type] (relative paths start at the "
                        "CSV's folder), or a folder/glob whose `<name>_mask.*` files are lesion masks")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--flag-rates", type=flag_rate, nargs="+", default=list(DEFAULT_FLAG_RATES), metavar="RATE",
                   help="normal flag rates (fractions such as 0.05 or percentages such as 5%%) whose calibrated "
                        "thresholds give the Dice and lesion detection figures (default: 0.05 0.01)")
    p.add_argument("--score", choices=("full", "l1"), default="full",
                   help="full: the RA score L1 x LPIPS x LPIPS-after-CLAHE; l1: |x - x_ph| only (ablation)")
    p.add_argument("--calibration-data", nargs="+", default=None, metavar="NORMALS",
                   help="normal scans held out from training (folder, glob, CSV or paths) to calibrate the "
                        "thresholds for the chosen score; default: the model card's table for --score full, the "
                        "test set's own normal scans (in-sample, reported so) for --score l1")
    add_device_option(p)
    p.add_argument("--batch-size", type=positive(int), default=8, help="slices per network pass (default: 8)")
    p.add_argument("--examples", type=_count, default=6, metavar="N",
                   help="scans shown in examples.png, those with lesions first (default: 6; 0: no examples.png)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier evaluation in --out")
    add_progress_options(p, quiet_help="no progress bar and no summary")
    p.set_defaults(run=cmd_eval)


def cmd_eval(args) -> int:
    from .devices import resolve_device
    from .errors import Cancelled
    from .evaluation import evaluate
    from .modeldir import load_model
    from .progress import Progress
    from .registry import resolve_model

    wanted = [name for name in OUTPUTS if name != "examples.png" or args.examples > 0]
    existing = [args.out / name for name in OUTPUTS if (args.out / name).exists()]
    if existing and not args.overwrite:
        raise RAError(f"{len(existing)} output file(s) of an earlier evaluation exist in {args.out} "
                      f"({', '.join(p.name for p in existing)}): pass --overwrite to replace them, or choose another "
                      "--out")
    model_dir = resolve_model(args.model)
    model = load_model(model_dir, device=resolve_device(args.device))
    progress = Progress(args.progress_json, bar=not args.quiet and args.progress_json != "-")
    try:
        with stop_on_signals(progress):
            result, examples = evaluate(model, args.data, kind=args.score, flag_rates=args.flag_rates,
                                        calibration_data=args.calibration_data, batch_size=args.batch_size,
                                        examples=args.examples, progress=progress, folder=args.out)
    except Cancelled:
        progress.emit("error", message="cancelled: nothing was written")
        progress.close()
        print("ra eval: cancelled; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:
        progress.emit("error", message=str(exc))
        progress.close()
        raise
    metrics = {"notice": model.card.get("notice"), **_header(model, model_dir, args), **result.metrics}
    write_outputs(args.out, metrics, result.curves, examples, write_examples=args.examples > 0)
    for name in set(OUTPUTS) - set(wanted):  # an earlier run's examples.png would not belong to this one
        (args.out / name).unlink(missing_ok=True)
    progress.emit("done", message=f"evaluated {metrics['data']['evaluated']} scan(s) -> {args.out}")
    progress.close()
    if not args.quiet:
        print(summary(metrics, args.out), file=sys.stderr)
    return 0


def _header(model, model_dir: Path, args) -> dict:
    from . import __version__

    card = model.card
    return {
        "model": {"name": card.get("name"), "path": str(Path(model_dir).absolute()),
                  "weights_sha256": card.get("weights_sha256"), "method": card.get("method", "ra"),
                  "preset": card["preset"]["name"], "lpips_backbone": (card.get("lpips") or {}).get("backbone")},
        "command": list(getattr(args, "command_line", None) or []),
        "device": str(model.device),
        "software": {"ra_engine": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_outputs(out: Path, metrics: dict, curves: dict, examples: list, write_examples: bool = True) -> None:
    """The PNG figures and metrics.md, then metrics.json last (its presence marks a complete evaluation); each file
    written atomically."""
    from .atomic import atomic_write
    from .eval_plots import plot_curves, plot_examples, plot_per_type

    counts = metrics["counts"]
    pixel = {**metrics["pixel_level"], "prevalence": (counts["lesion_pixels"] / counts["pixels_in_mask"]
                                                      if counts["pixels_in_mask"] else None)}
    image = {**metrics["image_level"], "prevalence": counts["abnormal"] / counts["scans"]}
    plot_curves(curves.get("pixel"), "pixel", pixel, out / "pixel_curves.png")
    plot_curves(curves.get("image"), "image", image, out / "image_curves.png")
    rates = metrics["thresholds"]["flag_rates"] if metrics["thresholds"]["values"] is not None else []
    plot_per_type(metrics["per_type"], rates, out / "per_type.png")
    if write_examples:
        values = metrics["thresholds"]["values"]
        plot_examples(examples, values[0] if values else None, out / "examples.png")
    write_text = lambda name, text: atomic_write(out / name, lambda p: Path(p).write_text(text, encoding="utf-8"))
    write_text("metrics.md", markdown(metrics))
    write_text("metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")


# ---- metrics.md -------------------------------------------------------------------------------------------------


def _f(value, digits: int = 3) -> str:
    """A figure for a table: None as "n/a", floats with `digits` decimals."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pm(mean, sd) -> str:
    return "n/a" if mean is None else f"{mean:.3f} ± {_f(sd)}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
            ["| " + " | ".join(_f(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows] + [""])


def _undefined(section: dict) -> list[str]:
    return [f"- {key}: {reason}" for key, reason in (section.get("undefined") or {}).items()] + (
        [""] if section.get("undefined") else [])


def _size_classes(unit: str, bins: list[dict]) -> str:
    """"small < 100, medium 100 to < 1000, large >= 1000 mm^3" from metrics.json's size bins of one unit."""
    symbol = {"volume_mm3": "mm³", "area_mm2": "mm²"}.get(unit, unit)
    low, parts = None, []
    for b in bins:
        high = b["below"]
        parts.append(f"{b['class']} " + (f"< {high:g}" if low is None else
                                          f"{low:g} to < {high:g}" if high is not None else f"≥ {low:g}"))
        low = high
    return ", ".join(parts) + f" {symbol}"


def markdown(metrics: dict) -> str:
    """metrics.md: the figures of metrics.json as Markdown tables (n/a = undefined; the reasons are listed)."""
    model, score, thresholds = metrics["model"], metrics["score"], metrics["thresholds"]
    counts, image, pixel, lesion = (metrics["counts"], metrics["image_level"], metrics["pixel_level"],
                                    metrics["lesion_level"])
    rates = thresholds["flag_rates"]
    lines = [f"# Evaluation of {model['name']}", "", f"*{metrics.get('notice') or 'Research use only.'}*", "",
             f"- model: `{model['path']}` (method {model['method']}, preset {model['preset']}, LPIPS "
             f"{model['lpips_backbone']}), weights sha256 `{model['weights_sha256']}`",
             f"- score: **{score['kind']}**, {score['definition']}",
             f"- thresholds: {thresholds['source'] or 'none'}"
             + (f", {thresholds['meaning']}" if thresholds.get("meaning") else "")
             + (f" ({thresholds['undefined']})" if thresholds.get("undefined") else ""),
             f"- test set: `{metrics['data']['source']}`, {metrics['data']['evaluated']} of "
             f"{metrics['data']['rows']} scan(s) evaluated",
             f"- command: `{' '.join(metrics.get('command') or [])}`", ""]
    lines += ["## Counts", ""] + _table(["scans", "normal", "abnormal", "with known lesion pixels",
                                         "abnormal without lesion mask", "lesions", "lesion pixels",
                                         "healthy pixels"],
                                        [[counts["scans"], counts["normal"], counts["abnormal"],
                                          counts["with_known_lesion_pixels"], counts["abnormal_without_lesion_mask"],
                                          counts["lesions"], counts["lesion_pixels"], counts["healthy_pixels"]]])
    lines += ["## Image level", "", "Score: the mean of the anomaly map in the brain/body mask.", ""]
    lines += _table(["AUROC", "AP", "FPR at 95% TPR", "FPR at 99% TPR", "abnormal", "normal"],
                    [[image["auroc"], image["ap"], image["fpr_at_95_tpr"], image["fpr_at_99_tpr"],
                      image["n_abnormal"], image["n_normal"]]]) + _undefined(image)
    per_scan = pixel["per_scan"]
    lines += ["## Pixel level", "", "Inside the brain/body mask; pooled over all pixels, and per scan (mean ± sd over "
              f"the {per_scan['scans_with_both_classes']} scan(s) holding both classes).", ""]
    lines += _table(["pooled AUROC", "pooled AP", "per-scan AUROC", "per-scan AP",
                     f"best Dice, {pixel['best_dice']['note']}", "its threshold"],
                    [[pixel["auroc"], pixel["ap"], _pm(per_scan["auroc_mean"], per_scan["auroc_sd"]),
                      _pm(per_scan["ap_mean"], per_scan["ap_sd"]), pixel["best_dice"]["dice"],
                      _f(pixel["best_dice"]["threshold"], 6)]])
    lines += ["At the calibrated thresholds:", ""]
    lines += _table(["flag rate", "threshold", "Dice (pooled)", "Dice per scan", "sensitivity",
                     "healthy pixels flagged", "normal scans' pixels flagged"],
                    [[f"{r['flag_rate']:.1%}", _f(r["threshold"], 6), r["dice"],
                      _pm(r["dice_per_scan_mean"], r["dice_per_scan_sd"]), r["sensitivity"],
                      r["healthy_flagged_fraction"], r["normal_scans_flagged_fraction"]]
                     for r in pixel["at_flag_rate"]]) + _undefined(pixel)
    lines += ["## Lesion level", "", f"A lesion is {lesion['definition']}. {lesion['outside_mask']} of "
              f"{lesion['lesions']} lesion(s) lie wholly outside the brain/body mask (never detected). Size classes: "
              + "; ".join(_size_classes(unit, bins) for unit, bins in lesion["size_bins"].items()) + ".", ""]
    types = list(metrics["per_type"])
    header = ["flag rate", "all"] + [f"{name} (n={lesion['by_size'][name]})" for name in ("small", "medium", "large")]
    header += [f"{t}" for t in types]
    rows = []
    for r in lesion["at_flag_rate"]:
        cell = lambda d: "n/a" if d["rate"] is None else f"{d['rate']:.3f} ({d['detected']}/{d['lesions']})"
        rows.append([f"{r['flag_rate']:.1%}", cell(r)] + [cell(r["by_size"][n]) for n in ("small", "medium", "large")]
                    + [cell(r["by_type"][t]) for t in types])
    lines += ["Detection rate (detected/lesions):", ""] + _table(header, rows) + _undefined(lesion)
    lines += ["## Per anomaly type", "", "Image figures: the type's abnormal scans against all normal scans; pixel "
              "figures: pooled over the type's scans.", ""]
    lines += _table(["type", "scans", "lesions", "image AUROC", "image AP", "pixel AUROC", "pixel AP"]
                    + [f"detection rate at {rate:.1%}" for rate in (rates if thresholds["values"] else [])],
                    [[t, e["scans"], e["lesions"], e["image_auroc_vs_normal"], e["image_ap_vs_normal"],
                      e["pixel_auroc"], e["pixel_ap"]] + [d["rate"] for d in e["detection_rate"]]
                     for t, e in metrics["per_type"].items()])
    for t, e in metrics["per_type"].items():
        lines += [f"- {t}: {key}: {reason}" for key, reason in (e.get("undefined") or {}).items()]
    skipped = metrics["data"]["skipped"]
    if skipped:
        lines += ["", "## Skipped scans", ""] + _table(["image", "reason"],
                                                       [[s["image"], s["reason"].replace("|", "/")] for s in skipped])
    return "\n".join(lines).rstrip() + "\n"


def summary(metrics: dict, out: Path) -> str:
    image, pixel, lesion = metrics["image_level"], metrics["pixel_level"], metrics["lesion_level"]
    parts = [f"ra eval: {metrics['data']['evaluated']} scan(s), score {metrics['score']['kind']}",
             f"image AUROC {_f(image['auroc'])}, AP {_f(image['ap'])}",
             f"pixel AUROC {_f(pixel['auroc'])}, AP {_f(pixel['ap'])}"]
    for r in lesion["at_flag_rate"]:
        parts.append(f"lesions detected at {r['flag_rate']:.1%}: {_f(r['rate'])}")
    skipped = len(metrics["data"]["skipped"])
    return "; ".join(parts) + (f"; {skipped} scan(s) skipped" if skipped else "") + f" -> {out}"
