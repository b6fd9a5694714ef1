"""`ra detect` under torchrun: two CPU processes share the inputs, every output is written once, by one process, and
the outputs equal a single process's; the up-front refusals are made by all processes together."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom.data
import pytest

from ra_engine import cli
from ra_engine.detection.pipeline import detect
from ra_engine.io.images import read_image
from ra_engine.scoring.lpips_weights import load_lpips
from ra_engine.models.modeldir import load_model
from ra_engine.scoring.scorer import AnomalyScorer
from test_detect import calibrate, make_model
from test_detect_cli import KINDS, outputs, radiograph_pixels, write_png

NAMES = ("a", "b", "c", "d", "e")  # 5 inputs on 2 processes: rank 0 gets 3, rank 1 gets 2


@pytest.fixture(scope="module")
def xray_model(tmp_path_factory, alex_safetensors) -> Path:
    scorer = AnomalyScorer(load_lpips("alex", weights=alex_safetensors))
    directory = make_model(tmp_path_factory.mktemp("models") / "xray", "xray")
    model = load_model(directory)
    calibrate(directory, [detect(model, read_image(pydicom.data.get_testdata_file(name)), scorer)
                          for name in ("RG1_UNCI.dcm", "RG3_UNCI.dcm")])
    return directory


def inputs(folder: Path) -> list[Path]:
    folder.mkdir()
    chest, other = radiograph_pixels(step=16), radiograph_pixels("RG3_UNCI.dcm", step=16)
    pictures = (chest, chest[::-1], chest[:, ::-1], chest[8:, 4:], other)
    return [write_png(folder / f"{name}.png", pixels) for name, pixels in zip(NAMES, pictures)]


def torchrun_detect(*argv, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ra_engine.cli", "detect", *[str(a) for a in argv], "--device", "cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_two_processes_share_the_inputs_and_write_each_output_once_equal_to_one_process(
        xray_model, alex_safetensors, tmp_path, monkeypatch):
    images = inputs(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RA_LPIPS_WEIGHTS": str(alex_safetensors)}
    out, events = tmp_path / "out", tmp_path / "progress.jsonl"
    done = torchrun_detect(*images, "--model", xray_model, "--out", out, "--progress-json", events, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    expected = {p.name for name in NAMES for p in outputs(out, name, ".nii.gz").values()}
    assert sorted(os.listdir(out)) == sorted(expected), "each output once, no temporary files left"
    for name in NAMES:  # each input detected by one process only: one summary line in all
        assert done.stderr.count(f"{name}: scan score") == 1, done.stderr[-3000:]

    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert [e["event"] for e in lines if e["event"] == "start"] == ["start"], "only rank 0 reports"
    assert "2 processes" in lines[0]["message"]
    steps = [e["step"] for e in lines if e["event"] == "step"]
    assert steps == sorted(steps) and steps[-1] == len(NAMES), "progress counts both processes' inputs"
    assert lines[-1]["event"] == "done" and lines[-1]["message"].startswith(f"{len(NAMES)} of {len(NAMES)}")

    monkeypatch.setenv("RA_LPIPS_WEIGHTS", str(alex_safetensors))
    single = tmp_path / "single"
    assert cli.main(["detect", *map(str, images), "--model", str(xray_model), "--out", str(single), "--quiet",
                     "--device", "cpu"]) == 0
    for name in NAMES:
        ours, theirs = outputs(out, name, ".nii.gz"), outputs(single, name, ".nii.gz")
        for kind in KINDS:
            a, b = read_image(ours[kind], validate=False), read_image(theirs[kind], validate=False)
            assert a.array.shape == b.array.shape
            if kind == "detections":
                assert np.mean(a.array != b.array) < 1e-3, name  # a pixel within rounding of the threshold may flip
            else:
                np.testing.assert_allclose(a.array, b.array, atol=1e-5, err_msg=f"{name} {kind}")
        ra, rb = (json.loads(p["scores"].read_text()) for p in (ours, theirs))
        assert ra["input"] == rb["input"] and ra["threshold"] == rb["threshold"]
        assert ra["scan_score"] == pytest.approx(rb["scan_score"], rel=1e-5, abs=1e-7)

    # The outputs exist now: both processes refuse together (neither waits for the other) and nothing is touched.
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    again = torchrun_detect(*images, "--model", xray_model, "--out", out, "--quiet", env=env)
    assert again.returncode != 0
    assert again.stderr.count("exist already") >= 2, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
