"""Which image-level score separates normal from abnormal scans: the paper's (the mean of the anomaly map A) against
the alternatives, measured on a labelled list (a CSV with columns image, label; `ra eval`'s format).

    python benchmarks/image_scores.py --model RUN_OR_MODEL --data select.csv --out scores.json

Per image, in the model space: the mean of A in the brain/body mask (`mean_a`, the paper's), its 95th and 99th
percentiles (`a_p95`, `a_p99`), the plain reconstruction errors of D(mu) (`l1`, `mse`), the encoder's KL of q(z|x)
(`kl`) and its negative ELBO s*(beta_rec*SSE + beta_kl*KL) (`elbo`: in an introspective VAE the encoder is trained
to give real images a low one), and the trivial scores (the mean and the standard deviation of the image). For each:
image AUROC, AP and FPR at 95% TPR, the score as it is ("higher = more abnormal"); the trivial scores are also given
in their better direction (marked so: that direction is chosen with the labels). Choose on one list (the chest
recipe's select.csv), report on another (test.csv).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import ra_engine  # noqa: E402
from ra_engine.evaluation.metrics import image_level  # noqa: E402
from ra_engine.preprocess.pipeline import preprocess  # noqa: E402
from ra_engine.training.losses import kl_per_sample, sse_per_sample  # noqa: E402

KINDS = ("mean_a", "a_p95", "a_p99", "l1", "mse", "kl", "elbo", "image_mean", "image_sd")
TRIVIAL = ("image_mean", "image_sd")


@torch.inference_mode()
def scores_of(model, image, scorer) -> dict[str, float]:
    """The scores of one scan (its model-space slices with foreground pooled)."""
    slices = preprocess(image, model.card.preset)
    used = np.flatnonzero(slices.masks.reshape(len(slices), -1).any(1))
    x = torch.from_numpy(slices.images[used]).unsqueeze(1).to(model.device)
    masks = slices.masks[used]
    mu, logvar, _ = model.network.encoder(x)
    rec = model.network.decoder(mu)
    anomaly = scorer.score(x, rec).anomaly
    values = anomaly[masks]
    error = (x - rec)[:, 0].cpu().numpy()[masks]
    weights = ra_engine.LossWeights()
    s = 1.0 / (x.shape[-2] * x.shape[-1])
    sse, kl = sse_per_sample(x, rec).cpu().numpy(), kl_per_sample(mu, logvar).cpu().numpy()
    pixels = slices.images[used][masks]
    return {"mean_a": float(values.mean()), "a_p95": float(np.percentile(values, 95)),
            "a_p99": float(np.percentile(values, 99)), "l1": float(np.abs(error).mean()),
            "mse": float((error ** 2).mean()), "kl": float(kl.mean()),
            "elbo": float((s * (weights.beta_rec * sse + weights.beta_kl * kl)).mean()),
            "image_mean": float(pixels.mean()), "image_sd": float(pixels.std())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory, run folder or registered name")
    parser.add_argument("--data", required=True, help="CSV with columns image, label (0 normal, 1 abnormal)[, type]")
    parser.add_argument("--out", type=Path, required=True, help="JSON of the figures (and every image's scores)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    model = ra_engine.load_model(args.model, args.device)
    scorer = ra_engine.make_scorer(model)
    sources = ra_engine.list_sources(args.data)
    rows = []
    for i, source in enumerate(sources):
        rows.append({"image": Path(source.image).name, "label": source.label, "type": source.type,
                     **scores_of(model, ra_engine.read_image(source.image), scorer)})
        if (i + 1) % 50 == 0:
            print(f"{i + 1}/{len(sources)}", file=sys.stderr)
    labels = [r["label"] for r in rows]
    figures = {}
    for kind in KINDS:
        values = [r[kind] for r in rows]
        figures[kind] = image_level(values, labels)
        if kind in TRIVIAL:
            flipped = image_level([-v for v in values], labels)
            if (flipped["auroc"] or 0) > (figures[kind]["auroc"] or 0):
                figures[kind] = {**flipped, "direction": "lower = more abnormal (chosen with the labels)"}
    types = sorted({r["type"] for r in rows if r["label"] == 1 and r["type"]})
    per_type = {t: {kind: image_level([r[kind] for r in rows if r["label"] == 0 or r["type"] == t],
                                      [r["label"] for r in rows if r["label"] == 0 or r["type"] == t])["auroc"]
                    for kind in KINDS} for t in types}
    result = {"model": str(model.path), "weights_sha256": model.card.weights_sha256, "data": str(args.data),
              "normal": labels.count(0), "abnormal": labels.count(1), "figures": figures, "auroc_by_type": per_type,
              "command": ["python", "benchmarks/image_scores.py", *(argv if argv is not None else sys.argv[1:])],
              "images": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for kind in KINDS:
        f = figures[kind]
        print(f"{kind:11s} AUROC {f['auroc']:.3f}  AP {f['ap']:.3f}  FPR@95 {f['fpr_at_95_tpr']:.3f}"
              f"  {' '.join(f'{t} {per_type[t][kind]:.3f}' for t in types)}{'  ' + f['direction'] if 'direction' in f else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
