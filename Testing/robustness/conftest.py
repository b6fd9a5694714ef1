"""The robustness suite (issue 13; what it measures is summed up in docs/SECURITY.md): generated bad inputs, damaged
files, trainings killed at random moments, full disks and read-only folders, hostile model files and archives, and
the Slicer logic under interference. Every case must end in a correct result or in one of the engine's documented
errors (`ra_engine.RAError`: DataError, ModelError, ...) with nothing lost and nothing half-written.

The default run (`pytest Testing`) keeps each part small; `RA_ROBUSTNESS=full` runs the full form (more hypothesis
examples, more kills): `RA_ROBUSTNESS=full OMP_NUM_THREADS=1 .venv/bin/python -m pytest Testing/robustness`. Tests
whose size differs between the two forms are marked `long` (`-m long` selects them).

The mechanisms that need root (a tiny tmpfs for a full disk, a read-only bind mount) skip with a reason where they
are not available; RLIMIT_FSIZE (a per-process file size limit, no root needed) covers full disks there too."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

TESTING = Path(__file__).resolve().parents[1]
if str(TESTING) not in sys.path:
    sys.path.insert(0, str(TESTING))  # fixtures_io and the helpers of test_detect, as the other tests use them

from robust_helpers import FULL, Mounts  # noqa: E402

# The default run draws the same examples every time (CI must not depend on luck); the full form draws new ones.
settings.register_profile("robustness", deadline=None, derandomize=not FULL, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.load_profile("robustness")


@pytest.fixture
def mounts():
    made = Mounts()
    yield made
    made.cleanup()


# ---- tiny models ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def offline_lpips(alex_safetensors):
    """LPIPS-alex found offline (RA_LPIPS_WEIGHTS) by every scorer built from a card, here and in subprocesses."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RA_LPIPS_WEIGHTS", str(alex_safetensors))
        yield alex_safetensors


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{"xray": ..., "brain-mri": ...}: tiny untrained RA models (32 x 32 slices, made as in test_detect), loaded on
    the CPU."""
    from ra_engine.models.modeldir import load_model
    from test_detect import make_model

    folder = tmp_path_factory.mktemp("tiny-models")
    return {preset: load_model(make_model(folder / preset, preset)) for preset in ("xray", "brain-mri")}
