"""The picture of a few radiographs through a chest model: per row one radiograph of a labelled list (the first
`--per-kind` of each pneumonia kind and of the normals, in the list's order: no picking by result), with its
input, the pseudo-healthy reconstruction and the anomaly map over it with the detections at the card's default
flag rate (green), and above each row the kind and the image-level score's percentile among the calibration's
normal scans.

    OMP_NUM_THREADS=1 python benchmarks/chest_figure.py --model /work/runs/chest_ra \\
        --data /work/runs/real/chest/test.csv --out docs/images/real/chest_pneumonia.png
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image as Picture
from PIL import ImageDraw

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import ra_engine  # noqa: E402
from ra_engine.detection.overlay import overlay_png  # noqa: E402

SIDE = 224


def chosen(data: Path, per_kind: int) -> list[tuple[str, str]]:
    """(image, kind) of the first `per_kind` rows of each kind (normal, then the pneumonia kinds)."""
    with open(data, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    kinds: dict[str, list[str]] = {}
    for row in rows:
        kind = "normal" if row["label"] == "0" else (row.get("type") or "abnormal")
        kinds.setdefault(kind, []).append(row["image"])
    order = ["normal"] + sorted(k for k in kinds if k != "normal")
    return [(image, kind) for kind in order for image in kinds.get(kind, [])[:per_kind]]


def grey(array: np.ndarray) -> Picture.Image:
    lo, hi = np.percentile(array, (1, 99))
    scaled = np.clip((array - lo) / max(hi - lo, 1e-12), 0, 1)
    return Picture.fromarray((scaled * 255).astype(np.uint8)).convert("RGB").resize((SIDE, SIDE))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True, help="CSV with columns image, label[, type]")
    parser.add_argument("--per-kind", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    model = ra_engine.load_model(args.model, "cpu")
    scorer = ra_engine.make_scorer(model)
    cases = chosen(args.data, args.per_kind)
    caption = 18
    sheet = Picture.new("RGB", (3 * SIDE, len(cases) * (SIDE + caption)), "black")
    draw = ImageDraw.Draw(sheet)
    with tempfile.TemporaryDirectory() as work:
        for row, (path, kind) in enumerate(cases):
            scan = ra_engine.read_image(path)
            result = ra_engine.detect(model, scan, scorer=scorer)
            overlay = overlay_png(scan, result.anomaly, result.detections_at(), Path(work) / f"{row}.png", scale=1)
            top = row * (SIDE + caption)
            percentile = result.calibration.percentile(result.scan_score, "scan") if result.calibration else None
            label = f"{kind}: {Path(path).name}" + ("" if percentile is None else
                                                      f", score at percentile {percentile:.0f} of normal")
            draw.text((4, top + 3), label, fill=(255, 255, 255))
            for column, picture in enumerate((grey(scan.array), grey(result.pseudo_healthy.array),
                                              Picture.open(overlay).convert("RGB").resize((SIDE, SIDE)))):
                sheet.paste(picture, (column * SIDE, top + caption))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.convert("P", palette=Picture.Palette.ADAPTIVE, colors=256).save(args.out, optimize=True)  # a third the size
    print(f"{len(cases)} radiographs -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
