"""`ra eval`'s figures as PNG files: ROC and PR curves, per-type bars and a grid of example scans.

matplotlib is imported inside the functions and drawn with its Agg canvas on `Figure` objects (never pyplot), so
importing this module is cheap and no global backend is set in the host process (e.g. Slicer). Every file is
written atomically (`atomic.atomic_write`)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ra_engine.core.files import atomic_write
from ra_engine.models.card import NOTICE

DPI = 110


def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    if figure.get_layout_engine() is not None:  # a label the layout makes room for
        figure.supxlabel(NOTICE, x=0.995, ha="right", fontsize=7, color="0.4")
    else:
        figure.text(0.995, 0.002, NOTICE, ha="right", va="bottom", fontsize=7, color="0.4")
    return atomic_write(path, lambda p: figure.savefig(p, format="png"), suffix=".png")


def _undefined(axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, fontsize=9, wrap=True)


def plot_curves(curves: dict | None, level: str, figures: dict, path: Path) -> Path:
    """ROC (left) and precision-recall (right) of one level ("pixel" or "image"). curves: {"roc": (fpr, tpr),
    "pr": (recall, precision)}, each in increasing rate / recall, or None (one class only); figures: that level's section of the metrics (auroc, ap,
    and the class counts shown in the title)."""
    figure = _figure(9.0, 4.2)
    roc_axes, pr_axes = figure.subplots(1, 2)
    for axes, title, x_label, y_label in ((roc_axes, "ROC", "false positive rate", "true positive rate"),
                                          (pr_axes, "precision-recall", "recall", "precision")):
        axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=x_label, ylabel=y_label, title=f"{level} level: {title}")
        axes.grid(alpha=0.3)
    if curves is None:
        reason = (figures.get("undefined") or {}).get("auroc", "undefined: only one class")
        for axes in (roc_axes, pr_axes):
            _undefined(axes, reason)
    else:
        fpr, tpr = curves["roc"]
        recall, precision = curves["pr"]
        roc_axes.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
        roc_axes.plot(fpr, tpr, lw=1.8, label=f"AUROC {figures['auroc']:.3f}")
        # AP sums each recall gain times the precision where it is reached: steps drawn "pre" on rising recall.
        pr_axes.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre", lw=1.8,
                     label=f"AP {figures['ap']:.3f}")
        prevalence = figures.get("prevalence")
        if prevalence is not None:
            pr_axes.axhline(prevalence, ls="--", color="0.6", lw=1, label=f"chance ({prevalence:.3g})")
        for axes in (roc_axes, pr_axes):
            axes.legend(loc="lower right" if axes is roc_axes else "upper right", fontsize=9)
    return _save(figure, path)


def plot_per_type(per_type: dict, flag_rates: Sequence[float], path: Path) -> Path:
    """Bars per anomaly type: lesion detection rate at each flag rate (left), pixel AP and image AP against the
    normal scans (right). A figure that is undefined for a type is left out and marked "n/a"."""
    figure = _figure(max(7.0, 2.2 + 1.3 * len(per_type)), 4.4)
    rate_axes, ap_axes = figure.subplots(1, 2)
    types = list(per_type) or ["(no abnormal scans)"]
    x = np.arange(len(types))
    panels = ((rate_axes, "lesion detection rate", [(f"flag rate {rate:.1%}",
                                                     [per_type[t]["detection_rate"][k]["rate"] for t in per_type])
                                                    for k, rate in enumerate(flag_rates)]),
              (ap_axes, "average precision", [("pixel AP", [per_type[t]["pixel_ap"] for t in per_type]),
                                              ("image AP vs normal", [per_type[t]["image_ap_vs_normal"]
                                                                      for t in per_type])]))
    for axes, title, series in panels:
        width = 0.8 / max(len(series), 1)
        for k, (label, values) in enumerate(series):
            offset = x[:len(values)] + (k - (len(series) - 1) / 2) * width
            heights = [0.0 if v is None else v for v in values]
            bars = axes.bar(offset, heights, width, label=label)
            for bar, value in zip(bars, values):
                axes.text(bar.get_x() + bar.get_width() / 2, (value or 0.0) + 0.01,
                          "n/a" if value is None else f"{value:.2f}", ha="center", va="bottom", fontsize=7)
        axes.set(ylim=(0, 1.12), title=title, xticks=x)
        axes.set_xticklabels([f"{t}\n(n={per_type[t]['lesions']} lesions)" if t in per_type else t for t in types],
                             fontsize=8, rotation=20 if len(types) > 4 else 0)
        axes.grid(axis="y", alpha=0.3)
        if series:
            axes.legend(fontsize=8, loc="upper right")
    if not flag_rates:
        _undefined(rate_axes, "no thresholds: see metrics.md")
    return _save(figure, path)


def plot_examples(examples: list, threshold: float | None, path: Path) -> Path:
    """One row per example scan: input, pseudo-healthy reconstruction, anomaly map, detections (A >= threshold in
    the brain/body mask; absent without a threshold) and the lesion mask (outlined on the input)."""
    from skimage.segmentation import find_boundaries

    columns = ("input", "pseudo-healthy", "anomaly map", "detections", "truth")
    rows = max(len(examples), 1)
    height = 2.5 * rows
    figure = _figure(2.3 * len(columns), height, layout=None)  # a fixed grid: no layout engine to run
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.2 / height, top=1 - 0.45 / height, wspace=0.04,
                           hspace=0.3)
    grid = np.atleast_2d(figure.subplots(rows, len(columns)))
    for axes in grid.ravel():
        axes.set_axis_off()
    if not examples:
        _undefined(grid[0, 0], "no scans to show")
    for row, example in zip(grid, examples):
        low, high = np.percentile(example.image[example.mask] if example.mask.any() else example.image, (1, 99))
        grey = dict(cmap="gray", vmin=low, vmax=max(high, low + 1e-12), interpolation="nearest")
        top = float(np.percentile(example.anomaly[example.mask], 99.5)) if example.mask.any() else 1.0
        truth = example.truth
        row[0].imshow(example.image, **grey)
        row[1].imshow(example.pseudo_healthy, **grey)
        row[2].imshow(example.anomaly, cmap="hot", vmin=0, vmax=max(top, 1e-12), interpolation="nearest")
        row[3].imshow(example.image, **grey)
        if threshold is not None:
            flagged = (example.anomaly >= threshold) & example.mask
            row[3].imshow(np.ma.masked_where(~flagged, flagged), cmap="autumn", alpha=0.6, interpolation="nearest")
        else:
            _undefined(row[3], "no threshold")
        row[4].imshow(example.image, **grey)
        if truth is not None:
            edge = find_boundaries(truth, mode="inner")
            row[4].imshow(np.ma.masked_where(~edge, edge), cmap="cool", interpolation="nearest")
        else:
            _undefined(row[4], "normal: no lesion" if example.label == 0 else "no lesion mask")
        where = "" if example.index is None else f", slice {example.index}"
        kind = "abnormal" if example.label else "normal"
        row[0].set_title(f"input: {Path(example.name).name}{where}\n{kind}"
                         f"{f' ({example.type})' if example.type else ''}, score {example.score:.3g}",
                         fontsize=7, loc="left")
        for axes, title in zip(row[1:], columns[1:]):
            axes.set_title(title, fontsize=8)
    return _save(figure, path)
