"""The files `ra eval` writes: metrics.json, metrics.md (the same figures as Markdown tables) and the figures of
`evaluation.plots`; each written atomically, metrics.json last (its presence marks a complete evaluation)."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Sequence

from ra_engine.core.errors import Cancelled, RAError
from ra_engine.core.files import atomic_write
from ra_engine.core.progress import Progress
from ra_engine.core.resources import VERSION
from ra_engine.evaluation.evaluate import evaluate
from ra_engine.evaluation.metrics import DEFAULT_FLAG_RATES
from ra_engine.evaluation.plots import plot_curves, plot_examples, plot_per_type
from ra_engine.models.modeldir import RAModel, load_model
from ra_engine.runtime.devices import resolve_device
from ra_engine.scoring.kinds import IMAGE_SCORES

OUTPUTS = ("metrics.json", "metrics.md", "pixel_curves.png", "image_curves.png", "per_type.png", "examples.png")


def evaluate_into(out: str | Path, model: str | Path, data, *, score: str = "full",
                  flag_rates: Sequence[float] = DEFAULT_FLAG_RATES, calibration_data=None, device: str = "auto",
                  batch_size: int = 8, examples: int = 6, overwrite: bool = False, progress: Progress | None = None,
                  command: list[str] | None = None) -> dict:
    """Evaluates `model` (a model directory, run folder or registered name) on the test set `data`
    (`evaluation.evaluate.evaluate`) and writes `OUTPUTS` into `out`; returns the metrics. Refuses an `out` holding
    an earlier evaluation unless `overwrite`; a cancelled or failed evaluation writes nothing."""
    out = Path(out)
    progress = progress or Progress()
    existing = [out / name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise RAError(f"{len(existing)} output file(s) of an earlier evaluation exist in {out} "
                      f"({', '.join(p.name for p in existing)}): pass --overwrite to replace them, or choose another "
                      "--out")
    loaded = load_model(model, device=resolve_device(device))
    try:
        result, views = evaluate(loaded, data, kind=score, flag_rates=flag_rates, calibration_data=calibration_data,
                                 batch_size=batch_size, examples=examples, progress=progress, folder=out)
    except Cancelled:
        progress.emit("error", message="cancelled: nothing was written")
        raise
    except Exception as exc:
        progress.emit("error", message=str(exc))
        raise
    metrics = {"notice": loaded.card.notice, **_header(loaded, command), **result.metrics}
    write_outputs(out, metrics, result.curves, views, write_examples=examples > 0)
    if examples == 0:  # an earlier run's examples.png would not belong to this one
        (out / "examples.png").unlink(missing_ok=True)
    progress.emit("done", message=f"evaluated {metrics['data']['evaluated']} scan(s) -> {out}")
    return metrics


def _header(model: RAModel, command: list[str] | None) -> dict:
    card = model.card
    return {
        "model": {"name": card.name, "path": str(Path(model.path).absolute()), "weights_sha256": card.weights_sha256,
                  "method": card.method, "preset": card.preset.name, "lpips_backbone": card.lpips_backbone,
                  "image_score": card.image_score, "image_score_definition": IMAGE_SCORES[card.image_score]},
        "command": list(command or []),
        "device": str(model.device),
        "software": {"ra_engine": VERSION},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_outputs(out: Path, metrics: dict, curves: dict, examples: list, write_examples: bool = True) -> None:
    """The PNG figures and metrics.md, then metrics.json last (its presence marks a complete evaluation); each file
    written atomically."""
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
    lines += ["## Image level", "", f"Score: {metrics['model'].get('image_score_definition', IMAGE_SCORES['mean_a'])}, "
              "in the brain/body mask.", ""]
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
