"""Slice store: build, reuse without reading, rebuild, skipped files, cancellation, worker processes, split by scan."""
import functools
import json

import numpy as np
import pytest
import SimpleITK as sitk

from fixtures_io import SLICE_SIZE, fake_preprocess, write_volume
from ra_engine.training import slicestore
from ra_engine.core.errors import Cancelled, DataError
from ra_engine.core.progress import Progress
from ra_engine.io.images import read_image
from ra_engine.training.slicestore import SliceStore, split_by_scan
from ra_engine.io.sources import Source

FINGERPRINT = {"preset": {"size": SLICE_SIZE}, "sources": ["test"]}


def make_sources(folder, depths=(3, 4, 5, 3), broken=()):
    """Volumes of the given depths (slices) as NIfTI files; indices in `broken` are written as garbage."""
    folder.mkdir(exist_ok=True)
    sources = []
    for i, depth in enumerate(depths):
        path = folder / f"scan{i}.nii.gz"
        if i in broken:
            path.write_bytes(b"this is not a NIfTI file" * 4)
        else:
            write_volume(path, shape=(depth, 20, 24), seed=i)
        sources.append(Source(path))
    return sources


class CountingPreprocess:
    """`fake_preprocess`, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, image, mask):
        self.calls += 1
        return fake_preprocess(image, mask)


def test_build_writes_memory_mapped_slices(tmp_path):
    sources = make_sources(tmp_path / "data")
    store = SliceStore.build(sources, fake_preprocess, tmp_path / "cache", FINGERPRINT)
    assert len(store) == 15 and store.n_scans == 4 and store.slice_counts == [3, 4, 5, 3]
    assert isinstance(store.images, np.memmap) and store.images.dtype == np.float32
    assert store.images.shape == store.masks.shape == (15, SLICE_SIZE, SLICE_SIZE) and store.masks.dtype == bool
    assert store.scan_index.dtype == np.int32 and store.scan_index.tolist() == [0] * 3 + [1] * 4 + [2] * 5 + [3] * 3
    expected = fake_preprocess(read_image(sources[2].image), None)
    assert np.array_equal(store.images[7:12], expected.images) and np.array_equal(store.masks[7:12], expected.masks)
    assert store.sources == sources and store.skipped == []
    manifest = json.loads((tmp_path / "cache" / "store.json").read_text())
    assert manifest["fingerprint"] == FINGERPRINT and manifest["sources"][1]["slices"] == 4
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["images.npy", "masks.npy", "scan_index.npy",
                                                                      "store.json"]


def test_same_fingerprint_reuses_without_reading(tmp_path, monkeypatch):
    sources = make_sources(tmp_path / "data")
    first = SliceStore.build(sources, fake_preprocess, tmp_path / "cache", {"a": (1, 2), "b": tmp_path})
    counting = CountingPreprocess()

    def no_reading(*args, **kwargs):
        raise AssertionError("an image was read")

    monkeypatch.setattr(slicestore, "read_image", no_reading)
    again = SliceStore.build(sources, counting, tmp_path / "cache", {"a": (1, 2), "b": tmp_path})
    assert counting.calls == 0 and np.array_equal(again.images, first.images)


def test_changed_fingerprint_rebuilds(tmp_path):
    sources = make_sources(tmp_path / "data")
    SliceStore.build(sources, fake_preprocess, tmp_path / "cache", FINGERPRINT)
    counting = CountingPreprocess()
    store = SliceStore.build(sources[:2], counting, tmp_path / "cache", {**FINGERPRINT, "sources": ["other"]})
    assert counting.calls == 2 and len(store) == 7 and store.fingerprint["sources"] == ["other"]
    assert SliceStore.open(tmp_path / "cache", FINGERPRINT) is None


def test_unreadable_files_are_skipped_with_their_reason(tmp_path):
    sources = make_sources(tmp_path / "data", broken=(1,))
    with pytest.warns(UserWarning, match="1 of 4 sources skipped:\n  .*scan1.nii.gz: cannot read"):
        store = SliceStore.build(sources, fake_preprocess, tmp_path / "cache", FINGERPRINT)
    assert store.n_scans == 3 and store.slice_counts == [3, 5, 3]
    assert [s.image for s in store.skipped] == [sources[1].image] and "damaged" in store.skipped[0].error
    assert store.scan_index.max() == 2 and store.sources == [sources[0], sources[2], sources[3]]


def test_too_many_unreadable_files_is_an_error_listing_them(tmp_path):
    sources = make_sources(tmp_path / "data", broken=(0, 2, 3))
    with pytest.raises(DataError, match="(?s)3 of 4 sources could not be used.*scan0.*scan2.*scan3"):
        SliceStore.build(sources, fake_preprocess, tmp_path / "cache", FINGERPRINT)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


def test_bad_preprocessing_output_is_a_skip_reason(tmp_path):
    sources = make_sources(tmp_path / "data", depths=(3, 3, 3))

    def out_of_range_for_the_first(image, mask):
        result = fake_preprocess(image, mask)
        if image.source.endswith("scan0.nii.gz"):
            result.images *= 2
        return result

    with pytest.warns(UserWarning, match=r"outside \[0, 1\]"):
        store = SliceStore.build(sources, out_of_range_for_the_first, tmp_path / "cache", FINGERPRINT)
    assert store.n_scans == 2


def test_mixed_dimensions_and_slice_sizes_are_errors(tmp_path):
    sources = make_sources(tmp_path / "data", depths=(3, 4))
    flat = tmp_path / "data" / "radiograph.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(400, dtype=np.uint8).reshape(20, 20)), str(flat))
    with pytest.raises(DataError, match=r"mixed dimensions: 2D images \(radiograph.png\) and 3D volumes "
                                        r"\(scan0.nii.gz, scan1.nii.gz\): use one kind per data set"):
        SliceStore.build([*sources, Source(flat)], fake_preprocess, tmp_path / "cache", FINGERPRINT)

    def size_by_depth(image, mask):
        return fake_preprocess(image, mask, size=16 if len(image.array) == 4 else 32)

    with pytest.raises(DataError, match="slices differ in size .*32x32: scan0.nii.gz; 16x16: scan1.nii.gz"):
        SliceStore.build(sources, size_by_depth, tmp_path / "cache", FINGERPRINT)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


def test_cancellation_leaves_no_store(tmp_path):
    sources = make_sources(tmp_path / "data")
    SliceStore.build(sources, fake_preprocess, tmp_path / "cache", FINGERPRINT)
    calls = []

    def callback(event):
        calls.append((event["step"], event["total_steps"], event["message"]))
        return event["step"] < 2

    with pytest.raises(Cancelled):
        SliceStore.build(sources, fake_preprocess, tmp_path / "cache", {"other": 1}, progress=Progress(callback=callback))
    assert calls == [(1, 4, "preprocessing: scan0.nii.gz"), (2, 4, "preprocessing: scan1.nii.gz")]
    cache = tmp_path / "cache"
    assert not (cache / "store.json").exists() and not any(p.name.startswith(".building") for p in cache.iterdir())
    assert SliceStore.open(cache, FINGERPRINT) is None and SliceStore.open(cache, {"other": 1}) is None


def test_worker_processes_give_the_same_store(tmp_path):
    sources = make_sources(tmp_path / "data", broken=(2,))
    with pytest.warns(UserWarning, match="scan2"):
        serial = SliceStore.build(sources, fake_preprocess, tmp_path / "serial", FINGERPRINT)
    seen = []
    with pytest.warns(UserWarning, match="scan2"):
        parallel = SliceStore.build(sources, functools.partial(fake_preprocess, size=SLICE_SIZE), tmp_path / "pool",
                                    FINGERPRINT, workers=2, progress=Progress(callback=lambda e: seen.append(e["step"])))
    assert sorted(seen) == [1, 2, 3, 4]
    assert np.array_equal(parallel.images, serial.images) and np.array_equal(parallel.masks, serial.masks)
    assert np.array_equal(parallel.scan_index, serial.scan_index) and parallel.sources == serial.sources
    with pytest.raises(TypeError, match="picklable"):
        SliceStore.build(sources, lambda image, mask: None, tmp_path / "lambda", FINGERPRINT, workers=1)


def test_split_by_scan_holds_out_whole_scans(tmp_path):
    store = SliceStore.build(make_sources(tmp_path / "data", depths=(2, 3, 2, 4, 3, 2, 2, 3, 2, 3)),
                             fake_preprocess, tmp_path / "cache", FINGERPRINT)
    train, val = split_by_scan(store, 0.2, seed=2109)
    assert len(set(store.scan_index[val])) == 2
    assert not set(store.scan_index[train]) & set(store.scan_index[val])
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(store)))
    again = split_by_scan(store, 0.2, seed=2109)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert len(set(store.scan_index[split_by_scan(store, 0.01)[1]])) == 1  # at least one scan
    with pytest.raises(DataError, match="between 0 and 1"):
        split_by_scan(store, 1.0)


def test_single_scan_falls_back_to_holding_out_slices(tmp_path):
    store = SliceStore.build(make_sources(tmp_path / "data", depths=(12,)), fake_preprocess, tmp_path / "cache",
                             FINGERPRINT)
    with pytest.warns(UserWarning, match="one scan only: validation holds out slices"):
        train, val = split_by_scan(store, 0.1)
    assert len(val) == 1 and len(train) == 11 and not set(train) & set(val)
