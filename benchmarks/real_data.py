"""The real cohorts beside the project (`../shared/data`, its README gives sources, licences and rules) as the lists
the bundled models are trained, validated, calibrated and tested on. Nothing from there enters the repository: the
lists name the files where they lie, in a folder of the caller's (a run folder outside the repository).

    python benchmarks/real_data.py chest --out /work/runs/real/chest     # train.csv val.csv select.csv test.csv
    python benchmarks/real_data.py brain --out /work/runs/real/brain     # train.csv val.csv ms.csv

The data folder is $RA_SHARED_DATA, else ../shared/data beside the repository; `data_root()` is None when it is
absent (tests and benchmarks that need it skip then).

Chest (Kermany et al. 2018, CC BY 4.0): the normal training radiographs are split by patient (the number after
`IM-`, with its `NORMAL2-` prefix) into training (80%), validation and calibration (10%: early stopping, thresholds)
and test normals (10%), with the project's seed. `pneumonia-dev` is split by patient into two halves: `select.csv`
(validation normals + the first half) is where choices are made (the image-level score), `test.csv` (test normals
+ the other half) is where they are reported, so that no figure is measured where it was chosen.

Brain (every normal T1 there is): the OASIS-1 and ANTsPy axial slices (2D, placed in the model space by
`ra_engine.preprocess.slices`), the two whole heads of `t1-heads/`, and the registry subjects bundled with ra
(`ra_engine/resources/samples`: the MNI152 2009a and FSL MNI152 templates, the ITK subject with its brain mask).
Colin27, the reference head, is left out: it is the synthetic benchmark's and the demo's test subject. Validation
and calibration: the head `chris_t1` and a seeded 5% of the OASIS slices (OASIS gives no subject identifiers, so
slices of one subject may fall on both sides). `ms.csv`: the multiple sclerosis patient's T1 with its lesion mask,
for `ra eval`.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENV_VAR = "RA_SHARED_DATA"
SEED = 2109


def data_root() -> Path | None:
    """The shared data folder, or None when it is not there."""
    folder = Path(os.environ.get(ENV_VAR) or REPO.parent / "shared" / "data")
    return folder if folder.is_dir() else None


def chest_patient(path: Path) -> str:
    """The patient of a radiograph of the chest data set: `NORMAL2-IM-1422-0001.jpeg` -> `NORMAL2-IM-1422`,
    `person1007_virus_1690.jpeg` -> `person1007`."""
    name = path.name
    match = re.match(r"((?:NORMAL2-)?IM-\d+)-", name) or re.match(r"(person\d+)_", name)
    if match is None:
        raise ValueError(f"{name} is not named like the chest data set's radiographs")
    return match.group(1)


def pneumonia_kind(path: Path) -> str:
    """`bacterial` or `viral`, from the file name (`person1_bacteria_1.jpeg`, `person10_virus_35.jpeg`)."""
    return "viral" if "_virus_" in path.name else "bacterial"


def split_patients(paths: list[Path], shares: tuple[float, ...], seed: int = SEED) -> list[list[Path]]:
    """`paths` in groups of whole patients with about the given shares of patients (the last takes the rest)."""
    patients = sorted({chest_patient(p) for p in paths})
    order = np.random.default_rng(seed).permutation(len(patients))
    bounds = np.cumsum([round(s * len(patients)) for s in shares[:-1]])
    groups = np.split(order, bounds)
    chosen = [{patients[i] for i in group} for group in groups]
    return [[p for p in paths if chest_patient(p) in group] for group in chosen]


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def chest_lists(out: Path, root: Path, seed: int = SEED) -> dict[str, Path]:
    normals = sorted((root / "chest-xray" / "normal-train").glob("*.jpeg"))
    pneumonia = sorted((root / "chest-xray" / "pneumonia-dev").glob("*.jpeg"))
    train, val, test = split_patients(normals, (0.8, 0.1, 0.1), seed)
    first, second = split_patients(pneumonia, (0.5, 0.5), seed + 1)
    normal = lambda paths: [{"image": str(p), "label": 0, "type": ""} for p in paths]
    sick = lambda paths: [{"image": str(p), "label": 1, "type": pneumonia_kind(p)} for p in paths]
    return {
        "train": write_csv(out / "train.csv", [{"image": str(p)} for p in train]),
        "val": write_csv(out / "val.csv", [{"image": str(p)} for p in val]),
        "select": write_csv(out / "select.csv", normal(val) + sick(first)),
        "test": write_csv(out / "test.csv", normal(test) + sick(second)),
    }


def brain_lists(out: Path, root: Path, seed: int = SEED) -> dict[str, Path]:
    brain = root / "brain-mri"
    samples = REPO / "ra_engine" / "resources" / "samples"
    oasis = sorted((brain / "oasis-t1-slices").glob("*.jpg"))
    held = set(np.random.default_rng(seed).permutation(len(oasis))[:round(0.05 * len(oasis))].tolist())
    train = [{"image": str(p), "mask": ""} for i, p in enumerate(oasis) if i not in held]
    train += [{"image": str(p), "mask": ""} for p in sorted((brain / "antspy-t1-slices").glob("*.jpg"))]
    train += [{"image": str(brain / "t1-heads" / "otsu.nii.gz"), "mask": ""},
              {"image": str(samples / "mni152_2009a_t1.nii.gz"), "mask": ""},
              {"image": str(samples / "fsl_mni152_t1_brain.nii.gz"), "mask": ""},
              {"image": str(samples / "itk_subject_t1.nii.gz"), "mask": str(samples / "itk_subject_brain_mask.nii.gz")}]
    val = [{"image": str(brain / "t1-heads" / "chris_t1.nii.gz"), "mask": ""}]
    val += [{"image": str(p), "mask": ""} for i, p in enumerate(oasis) if i in held]
    ms = brain / "ms-patient07"
    return {
        "train": write_csv(out / "train.csv", train),
        "val": write_csv(out / "val.csv", val),
        "ms": write_csv(out / "ms.csv", [{"image": str(ms / "T1.nii.gz"), "mask": str(ms / "lesions.nii.gz"),
                                          "label": 1, "type": "multiple sclerosis"}]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cohort", choices=("chest", "brain"))
    parser.add_argument("--out", type=Path, required=True, help="folder for the lists (outside the repository)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    root = data_root()
    if root is None:
        print(f"no shared data: set {ENV_VAR} or put it at {REPO.parent / 'shared' / 'data'}", file=sys.stderr)
        return 2
    lists = (chest_lists if args.cohort == "chest" else brain_lists)(args.out, root, args.seed)
    for name, path in lists.items():
        with open(path, encoding="utf-8") as f:
            print(f"{name}: {sum(1 for _ in f) - 1} rows -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
