"""The prepared GPU run (benchmarks/device_run.py) rehearsed on the CPU: a real tiny `ra train` run folder is packed by
`prepare`, the `--dry-run` of the run goes through every phase with tiny inputs (the CUDA comparisons report
"skipped: no CUDA"), trains the bundled cohort a few steps, and leaves what the GPU machine may return (at most 8
files of 16 MiB, 64 MiB together, plain names); the returned weights become a loadable model directory."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import device_run  # noqa: E402

import ra_engine  # noqa: E402
from ra_engine.core.image import Geometry, Image  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real `ra train` run folder (cache/, checkpoints/, train.log) of a tiny xray network on 8 radiographs."""
    root = tmp_path_factory.mktemp("tiny_run")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        path = root / "data" / f"r{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        ra_engine.write_image(Image(rng.integers(0, 4096, (32, 32)).astype(np.float32), Geometry.identity(2)), path,
                              dtype="uint16")
        paths.append(str(path))
    arch = ra_engine.ArchConfig(image_size=16, latent_dim=4, widths=(4, 8))
    config = ra_engine.TrainConfig(epochs=100, batch_size=2, lr=1e-3, max_steps=3, checkpoint_every=0,
                                   augment=ra_engine.AugmentConfig(flip=False))
    ra_engine.train(paths, root / "run", preset="xray", arch=arch, config=config, device="cpu", val_fraction=0.25,
                    calibrate=False)
    return root / "run"


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bundle")
    empty_wheels = tmp_path_factory.mktemp("wheels")
    assert device_run.main(["prepare", "--run", f"tiny={tiny_run}", "--bundle", str(folder),
                            "--wheels", str(empty_wheels)]) == 0
    return folder


def test_prepare_packs_slices_split_options_and_weights(bundle, tiny_run):
    manifest = json.loads((bundle / "manifest.json").read_text())
    (entry,) = manifest["cohorts"]
    assert entry["name"] == "tiny" and entry["arch"]["image_size"] == 16 and entry["config"]["max_steps"] == 3
    assert entry["split"]["train"] == 6 and entry["split"]["val"] == 2  # 2 of 8 scans held out, as ra train did
    assert entry["slices"]["shape"] == [8, 16, 16] and entry["slices"]["max_quantisation_error"] <= 0.5 / 255 + 1e-7
    assert entry["weights"] and entry["weights"]["dtype"] == "float16" and entry["state"]["step"] == 3
    images, train, val, weights = device_run.unpack_cohort(bundle, entry)
    store = np.load(tiny_run / "cache" / "images.npy")
    assert np.abs(images - store).max() <= 0.5 / 255 + 1e-7 and len(train) + len(val) == len(store)
    assert any(k.startswith("adam.opt_e.") for k in weights) and any(k.startswith("decoder.") for k in weights)
    sizes = manifest["sizes"]
    assert sizes["tree_bytes"] + sizes["wheels_bytes"] + sizes["bundle_bytes"] <= 64 * 2 ** 20


def test_prepare_explains_a_missing_cache(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="slice cache .* missing or not complete yet"):
        device_run.main(["prepare", "--run", f"x={tmp_path / 'run'}", "--bundle", str(tmp_path / "b"),
                         "--wheels", str(tmp_path)])


def test_dry_run_goes_through_every_phase_within_the_output_limits(bundle, tmp_path):
    out = tmp_path / "out"
    assert device_run.main(["run", "--dry-run", "--bundle", str(bundle), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["environment"]["torch"]
    a, b, c = (summary["phases"][k] for k in ("a_correctness", "b_speed", "c_training"))
    assert a["status"] == "skipped" and a["clahe"] == a["detect"] == a["amp_training"] == "skipped: no CUDA"
    assert b["status"] == "done", b
    for name in ("t1", "radiograph"):
        assert b[f"stages_{name}"]["detect_seconds_cold"] > 0
    assert b["command_radiograph"]["seconds"] > 0
    assert b["train_tiny_16_fp32"]["iterations"] >= 2 and b["train_tiny_16_bf16"]["iterations_per_second"] > 0
    trained = c["tiny"]
    assert trained["status"] == "done" and trained["steps"] == 3 and trained["start"]["step"] == 3
    assert "resumed" in trained["init"]
    limits = summary["out_limits"]
    assert limits["ok"] and len(limits["files"]) <= 8, limits
    assert {f["file"] for f in limits["files"]} == {"summary.json", "summary.md", "tiny.safetensors",
                                                   "tiny_train.json"}
    log = json.loads((out / "tiny_train.json").read_text())
    assert log["steps"] == 3 and log["loss_trace"] and "rebuilt" in log["optimiser"]
    assert "## c. Training" in (out / "summary.md").read_text()

    model_dir = tmp_path / "model"
    assert device_run.main(["model", "--weights", str(out / "tiny.safetensors"), "--out", str(model_dir)]) == 0
    model = ra_engine.load_model(model_dir, device="cpu")
    assert model.card.architecture.image_size == 16 and model.card.preset.name == "xray"
    assert "CPU (dry run)" in model.card.training.weights_from and model.card.training.steps == 6
