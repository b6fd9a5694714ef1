"""Makes RAExtension/Screenshot01.png, the extension's picture for the Extensions Index, from a real detection.

    .venv/bin/python RAExtension/make_screenshot.py [--model ra_engine/resources/models/brain-t1-demo]

It runs what the module's self-test runs (the bundled Colin27 sample with `ra demo`'s synthetic lesion, detection
with the given model at its default flag rate, on the CPU) and draws the three slice views through the lesion as
Slicer shows them (radiological axial and coronal, sagittal with anterior to the left): the scan, the anomaly map in
heat colours, the detections outlined in green and the true lesion in dashed cyan, with the scores beside them. It
is drawn with matplotlib from the engine's output, not captured from the Slicer window, and says so in the picture.
"""
import argparse
from pathlib import Path

import numpy as np
from matplotlib import pyplot as plt
from matplotlib.colors import LinearSegmentedColormap

from ra_engine.demo import insert_lesion, LESION_CENTRE_LPS
from ra_engine.detection.pipeline import detect
from ra_engine.io.images import read_image
from ra_engine.models.card import NOTICE
from ra_engine.models.modeldir import load_model

ROOT = Path(__file__).resolve().parent.parent
HEAD = ROOT / "ra_engine" / "resources" / "reference" / "head.nii.gz"
OUT = ROOT / "RAExtension" / "Screenshot01.png"
HEAT = LinearSegmentedColormap.from_list("heat", ["#7a0000", "#ff3000", "#ffb000", "#ffff80"])


def views(array, index):
    """Axial, coronal and sagittal planes of a (z, y, x) LPS array through `index` (z, y, x), oriented for display
    (rows top to bottom, columns left to right): axial anterior up and patient right on the left, coronal superior
    up and patient right on the left, sagittal superior up and anterior on the left."""
    z, y, x = index
    return array[z], np.flipud(array[:, y, :]), np.flipud(array[:, :, x])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "ra_engine" / "resources" / "models" / "brain-t1-demo")
    parser.add_argument("--label", help="the model's name in the picture (default: its folder's name)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    model = load_model(args.model, device="cpu")
    scan, lesion = insert_lesion(read_image(HEAD))
    result = detect(model, scan)
    flag_rate = result.calibration["default_flag_rate"]
    labels = result.detections_at(flag_rate=flag_rate)
    report = result.report(labels, result.threshold_at(flag_rate), flag_rate)
    detections = labels.array > 0

    geometry = scan.geometry
    centre = [int(round((c - o) / s)) for c, o, s in zip(LESION_CENTRE_LPS, geometry.origin, geometry.spacing)][::-1]
    grey = scan.array / np.percentile(scan.array, 99.5)
    anomaly = result.anomaly.array
    shown = anomaly >= report["threshold"] * 0.5  # the faint part of the map stays transparent, as with Slicer's
    top = np.percentile(anomaly[result.mask.array > 0], 99.5)

    figure = plt.figure(figsize=(12, 4.6), dpi=110, facecolor="black")
    titles = ("Axial", "Coronal", "Sagittal")
    colours = ("#c0504d", "#4f81bd", "#9bbb59")  # the red, green and yellow bars of Slicer's views
    planes = zip(views(grey, centre), views(np.where(shown, anomaly, np.nan), centre), views(detections, centre),
                 views(lesion > 0, centre))
    for column, (image, heat, found, truth) in enumerate(planes):
        axes = figure.add_axes((0.30 + column * 0.235, 0.1, 0.225, 0.78))
        axes.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
        axes.imshow(heat, cmap=HEAT, vmin=report["threshold"] * 0.5, vmax=top, alpha=0.6, interpolation="nearest")
        axes.contour(found, levels=[0.5], colors=["#1ae633"], linewidths=1.2)
        axes.contour(truth, levels=[0.5], colors=["cyan"], linewidths=1.0, linestyles="dashed")
        axes.set_title(titles[column], color="white", fontsize=10, backgroundcolor=colours[column], loc="left")
        axes.axis("off")
        axes.set_anchor("N")  # the three views top-aligned, as in Slicer's row of views

    percentile = report["scan_percentile_of_normal"]
    flagged = detections[lesion > 0].mean()
    text = [
        ("Anomaly Detection (RA)", 13, "bold"),
        (f"Model: {args.label or args.model.name}", 9, "normal"),
        ("Input: Colin27 sample + synthetic lesion", 9, "normal"),
        ("", 6, "normal"),
        (f"Scan score: {report['scan_score']:.4g}", 10, "normal"),
        ("Percentile of normal: " + (f"{percentile:.0f}" if percentile is not None else "n/a"), 10, "normal"),
        (f"Flag rate: {100 * report['flag_rate']:.1f}%", 10, "normal"),
        (f"Regions: {report['regions_total']}, voxels: {report['flagged_voxels']}", 10, "normal"),
        (f"Lesion voxels flagged: {flagged:.0%}", 10, "normal"),
        ("", 6, "normal"),
        ("heat: anomaly map   green: detections", 8, "normal"),
        ("dashed cyan: the synthetic lesion", 8, "normal"),
        ("", 6, "normal"),
        (NOTICE, 10, "bold"),
    ]
    y = 0.88
    for line, size, weight in text:
        figure.text(0.02, y, line, color="white", fontsize=size, fontweight=weight)
        y -= 0.0048 * size
    figure.text(0.02, 0.03, "Drawn with matplotlib from the engine's output (RAExtension/make_screenshot.py), "
                "not a capture of the Slicer window.", color="#a0a0a0", fontsize=7)
    figure.savefig(args.out, facecolor="black")
    print(f"{args.out}: lesion {flagged:.0%} flagged at flag rate {report['flag_rate']:.1%}")


if __name__ == "__main__":
    main()
