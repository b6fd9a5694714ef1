"""`ra eval`'s metrics without a network: the exact pooled ranking against scikit-learn and hand-checked cases,
undefined figures with one class, Dice, the lesion rule (more than 10% flagged), size classes, the accumulator's
figures against a direct computation on all pixels at once, lesion masks on other grids, labels, and the L1 score."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from ra_engine.core.errors import DataError
from ra_engine.evaluation.metrics import (dice, dice_from_counts, Evaluator, image_level, is_detected, lesion_mask_on_grid, mean_sd, PooledRanking, scan_label, size_bin)
from ra_engine.core.image import Geometry, Image
from ra_engine.scoring.scorer import AnomalyScorer


# ---- pooled ranking -----------------------------------------------------------------------------------------------


def test_pooled_ranking_hand_checked():
    ranking = PooledRanking(np.array([0.9, 0.4]))
    ranking.add_negatives(np.array([0.1, 0.4]))
    ranking.add_negatives(np.array([0.8]))
    # AUROC: 0.9 beats all three negatives; 0.4 beats 0.1, ties 0.4 (half), loses to 0.8: (3 + 1.5) / 6.
    assert ranking.auroc() == pytest.approx(0.75)
    # AP: at 0.9 recall 1/2 with precision 1; at 0.4 recall 1 with precision 2/4.
    assert ranking.average_precision() == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    # Dice 2 TP / (TP + FP + P): at 0.9 2/3, at 0.8 2/4, at 0.4 4/6; the lowest threshold of the best is kept.
    assert ranking.best_dice() == (pytest.approx(2 / 3), pytest.approx(0.4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooled_ranking_equals_sklearn_on_all_pixels_with_ties(seed):
    rng = np.random.default_rng(seed)
    negatives = np.round(rng.gamma(2.0, 1.0, 5000), 1).astype(np.float32)  # many ties, also with positives
    positives = np.round(rng.gamma(3.0, 1.0, 300), 1).astype(np.float32)
    ranking = PooledRanking(positives)
    for chunk in np.array_split(negatives, 7):
        ranking.add_negatives(chunk)
    scores = np.r_[positives, negatives]
    labels = np.r_[np.ones(positives.size), np.zeros(negatives.size)]
    assert ranking.auroc() == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert ranking.average_precision() == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    candidates = np.unique(scores)
    brute = max(dice(scores >= t, labels > 0) for t in candidates)
    assert ranking.best_dice()[0] == pytest.approx(brute, abs=1e-12)
    curves = ranking.curves(max_points=10**6)
    fpr, tpr = curves["roc"]
    assert np.trapezoid(tpr, fpr) == pytest.approx(ranking.auroc(), abs=1e-12)
    sk_fpr, sk_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)  # a point at every distinct score
    assert set(zip(fpr.round(12), tpr.round(12))) <= set(zip(sk_fpr.round(12), sk_tpr.round(12)))


def test_two_class_figures_are_null_with_one_class():
    only_abnormal = image_level([0.2, 0.5, 0.9], [1, 1, 1])
    assert only_abnormal["auroc"] is None and only_abnormal["ap"] is None and only_abnormal["fpr_at_95_tpr"] is None
    assert only_abnormal["undefined"]["auroc"].startswith("undefined: only one class (3 abnormal, 0 normal)")
    no_negatives = PooledRanking(np.array([0.3, 0.7]))
    assert no_negatives.auroc() is None and no_negatives.average_precision() is None
    assert "only one class" in no_negatives.undefined and no_negatives.curves() is None
    assert no_negatives.best_dice()[0] == pytest.approx(1.0)  # flagging both: a defined, perfect Dice
    no_positives = PooledRanking(np.empty(0))
    no_positives.add_negatives(np.array([0.1, 0.2]))
    assert no_positives.auroc() is None and no_positives.best_dice() == (None, None)


def test_image_level_figures():
    scores = [0.1, 0.2, 0.5, 0.6, 0.3, 0.7, 0.8, 0.9]
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    result = image_level(scores, labels)
    assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["ap"] == pytest.approx(average_precision_score(labels, scores))
    # TPR >= 95% needs all four abnormal scans: threshold 0.3 also flags 0.5 and 0.6 of the four normal ones.
    assert result["fpr_at_95_tpr"] == result["fpr_at_99_tpr"] == 0.5
    assert (result["n_abnormal"], result["n_normal"]) == (4, 4) and "undefined" not in result


def test_dice_and_mean_sd():
    flagged = np.array([[1, 1, 0], [0, 1, 0]], bool)
    truth = np.array([[1, 0, 0], [0, 1, 1]], bool)
    assert dice(flagged, truth) == pytest.approx(2 * 2 / (3 + 3))
    assert dice(np.zeros(4, bool), np.zeros(4, bool)) is None and dice_from_counts(0, 3, 0) == 0.0
    assert mean_sd([0.5, None, 0.7]) == (pytest.approx(0.6), pytest.approx(np.std([0.5, 0.7], ddof=1)), 2)
    assert mean_sd([0.5]) == (0.5, None, 1) and mean_sd([]) == (None, None, 0)


def test_lesion_rule_and_size_classes():
    assert not is_detected(2, 20) and is_detected(3, 20)  # exactly 10% is not more than 10%
    assert [size_bin(v, "volume_mm3") for v in (99.9, 100, 999, 1000, 1e6)] == [
        "small", "medium", "medium", "large", "large"]
    assert size_bin(50, "area_mm2") == "small"


# ---- the accumulator ----------------------------------------------------------------------------------------------


def test_two_lesions_one_half_flagged_one_five_percent():
    truth = np.zeros((30, 30), bool)
    truth[2:6, 2:7] = True        # lesion A: 20 pixels, 125 mm^2 at 2.5 mm: medium
    truth[20:24, 10:15] = True    # lesion B: 20 pixels
    anomaly = np.zeros((30, 30), np.float32)
    anomaly[2:4, 2:7] = 1.0       # 10 of A's 20 pixels flagged (50%)
    anomaly[20, 10] = 1.0         # 1 of B's 20 pixels (5%)
    anomaly[10, 20:25] = 1.0      # 5 healthy pixels flagged
    mask = np.ones((30, 30), bool)
    with Evaluator() as evaluator:
        evaluator.add("scan", anomaly, mask, truth, 1, "mass", spacing=(2.5, 2.5))
        metrics = evaluator.metrics([(0.05, 0.5)]).metrics
    lesions = metrics["lesion_level"]
    assert lesions["lesions"] == 2 and lesions["by_size"] == {"small": 0, "medium": 2, "large": 0}
    at = lesions["at_flag_rate"][0]
    assert (at["lesions"], at["detected"], at["rate"]) == (2, 1, 0.5)
    assert at["by_type"]["mass"]["rate"] == 0.5 and at["by_size"]["small"]["rate"] is None
    assert at["by_size"]["small"]["undefined"] == "undefined: no lesions"
    pixel = metrics["pixel_level"]["at_flag_rate"][0]
    assert pixel["dice"] == pytest.approx(2 * 11 / (2 * 11 + 5 + 29))
    assert pixel["dice_per_scan_mean"] == pytest.approx(pixel["dice"]) and pixel["dice_per_scan_sd"] is None
    assert pixel["sensitivity"] == pytest.approx(11 / 40)
    assert pixel["healthy_flagged_fraction"] == pytest.approx(5 / (900 - 40))
    assert metrics["per_type"]["mass"]["detection_rate"][0]["rate"] == 0.5


def synthetic_scans(seed: int = 0):
    """Five scans of different sizes: three abnormal (two types) with lesions, two normal; masks cover part."""
    rng = np.random.default_rng(seed)
    scans = []
    for k, (label, type_) in enumerate([(1, "mass"), (0, None), (1, "edema"), (0, None), (1, "mass")]):
        shape = (3, 20 + 2 * k, 24)
        mask = np.zeros(shape, bool)
        mask[:, 2:-2, 3:-3] = True
        truth = np.zeros(shape, bool)
        if label:
            truth[1, 5:9 + k, 6:11] = True
            truth[2, 14:16, 15:18] = True
        anomaly = np.round(rng.gamma(2.0, 0.1, shape) + 0.3 * truth, 2).astype(np.float32) * mask
        scans.append((f"scan{k}", anomaly, mask, truth, label, type_))
    return scans


def test_accumulated_figures_equal_a_direct_computation_on_all_pixels():
    scans = synthetic_scans()
    thresholds = [(0.05, 0.45), (0.01, 0.6)]
    with Evaluator() as evaluator:
        for name, anomaly, mask, truth, label, type_ in scans:
            evaluator.add(name, anomaly, mask, truth, label, type_, spacing=(1.0, 1.0, 2.0))
        result = evaluator.metrics(thresholds)
    metrics = result.metrics
    values = np.concatenate([a[m] for _, a, m, _, _, _ in scans])
    labels = np.concatenate([t[m] for _, _, m, t, _, _ in scans])
    pixel = metrics["pixel_level"]
    assert pixel["auroc"] == pytest.approx(roc_auc_score(labels, values), abs=1e-12)
    assert pixel["ap"] == pytest.approx(average_precision_score(labels, values), abs=1e-12)
    per_scan = [roc_auc_score(t[m], a[m]) for _, a, m, t, label, _ in scans if label]
    assert pixel["per_scan"]["auroc_mean"] == pytest.approx(np.mean(per_scan))
    assert pixel["per_scan"]["auroc_sd"] == pytest.approx(np.std(per_scan, ddof=1))
    for (rate, threshold), at in zip(thresholds, pixel["at_flag_rate"]):
        assert at["dice"] == pytest.approx(dice(values >= threshold, labels))
        normal = np.concatenate([a[m] for _, a, m, _, label, _ in scans if not label])
        assert at["normal_scans_flagged_fraction"] == pytest.approx(np.mean(normal >= threshold))
    scores = [a[m].mean() for _, a, m, _, _, _ in scans]
    image = metrics["image_level"]
    assert image["auroc"] == pytest.approx(roc_auc_score([s[4] for s in scans], scores))
    mass = [i for i, s in enumerate(scans) if s[5] == "mass" or s[4] == 0]
    assert metrics["per_type"]["mass"]["image_auroc_vs_normal"] == pytest.approx(
        roc_auc_score([scans[i][4] for i in mass], [scores[i] for i in mass]))
    mass_pixels = [s for s in scans if s[5] == "mass"]
    assert metrics["per_type"]["mass"]["pixel_ap"] == pytest.approx(average_precision_score(
        np.concatenate([t[m] for _, _, m, t, _, _ in mass_pixels]),
        np.concatenate([a[m] for _, a, m, _, _, _ in mass_pixels])), abs=1e-12)
    assert metrics["counts"]["lesions"] == 6 and metrics["lesion_level"]["by_size"]["small"] == 6
    assert result.curves["pixel"] is not None and result.curves["image"] is not None


def test_abnormal_scans_without_lesion_pixels_count_at_image_level_only():
    _, anomaly, mask, _, _, _ = synthetic_scans()[1]
    with Evaluator() as evaluator:
        evaluator.add("normal", anomaly, mask, None, 0)
        evaluator.add("abnormal, empty mask", anomaly + 1, mask, np.zeros_like(mask), 1, "artefact")
        evaluator.add("abnormal, no mask", anomaly + 2, mask, None, 1)
        metrics = evaluator.metrics(None, "undefined: no thresholds (test)").metrics
    counts = metrics["counts"]
    assert (counts["normal"], counts["abnormal"], counts["with_known_lesion_pixels"]) == (1, 2, 1)
    assert counts["abnormal_without_lesion_mask"] == 2 and counts["lesion_pixels"] == 0
    assert metrics["image_level"]["auroc"] == 1.0
    pixel = metrics["pixel_level"]
    assert pixel["auroc"] is None and "only one class" in pixel["undefined"]["auroc"]
    assert pixel["undefined"]["at_flag_rate"] == "undefined: no thresholds (test)"
    assert metrics["per_type"]["artefact"]["pixel_ap"] is None
    assert metrics["per_type"]["unspecified"]["image_auroc_vs_normal"] == 1.0


# ---- lesion masks and labels --------------------------------------------------------------------------------------


def volume(shape, spacing, origin=(0.0, 0.0, 0.0), name="x") -> Image:
    return Image(np.zeros(shape, np.float32), Geometry(spacing, origin, tuple(np.eye(3).ravel())), name,
                 {"format": "nifti"})


def test_a_mask_on_a_coarser_grid_of_the_same_space_is_resampled_with_a_warning():
    image = volume((10, 20, 20), (1.0, 1.0, 1.0), name="scan.nii.gz")
    mask = volume((5, 10, 10), (2.0, 2.0, 2.0), origin=(0.5, 0.5, 0.5), name="lesion.nii.gz")
    mask.array[2, 3, 4] = 3  # any non-zero label is lesion
    with pytest.warns(UserWarning, match="resampled onto the image's grid"):
        truth = lesion_mask_on_grid(mask, image)
    expected = np.zeros((10, 20, 20), bool)
    expected[4:6, 6:8, 8:10] = True  # the coarse voxel covers 2 x 2 x 2 fine ones
    np.testing.assert_array_equal(truth, expected)


def test_a_mask_of_another_space_is_refused_and_one_of_the_same_shape_taken_pixel_for_pixel():
    image = volume((10, 20, 20), (1.0, 1.0, 1.0), name="scan.nii.gz")
    elsewhere = volume((5, 10, 10), (2.0, 2.0, 2.0), origin=(50.5, 0.5, 0.5), name="lesion.nii.gz")
    with pytest.raises(DataError, match="does not cover the same physical space"):
        lesion_mask_on_grid(elsewhere, image)
    with pytest.raises(DataError, match="2D"):
        lesion_mask_on_grid(Image(np.zeros((20, 20), np.float32), Geometry.identity(2), "m.png"), image)
    same = volume((10, 20, 20), (1.0, 1.0, 1.0), name="same.nii.gz")
    same.array[1, 2, 3] = 1
    truth = lesion_mask_on_grid(same, image)
    assert truth.dtype == bool and truth.sum() == 1 and truth[1, 2, 3]
    shifted = volume((10, 20, 20), (1.0, 1.0, 1.0), origin=(5.0, 0.0, 0.0), name="shifted.nii.gz")
    with pytest.warns(UserWarning, match="taken pixel for pixel"):
        lesion_mask_on_grid(shifted, image)


def test_scan_labels():
    empty, lesion = np.zeros(4, bool), np.array([0, 1, 0, 0], bool)
    assert scan_label(None, empty) == 0 and scan_label(None, lesion) == 1 and scan_label(1, empty) == 1
    with pytest.raises(DataError, match="labelled 0"):
        scan_label(0, lesion)
    with pytest.raises(DataError, match="neither a lesion mask nor a label"):
        scan_label(None, None)
    with pytest.raises(DataError, match="use 0"):
        scan_label(2, None)


# ---- the L1 score -------------------------------------------------------------------------------------------------


def test_the_l1_score_is_the_clamped_absolute_difference_and_needs_no_lpips():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-0.2, 1.2, (2, 1, 16, 16)).astype(np.float32))
    x_ph = torch.from_numpy(rng.uniform(-0.2, 1.2, (2, 1, 16, 16)).astype(np.float32))
    maps = AnomalyScorer(None, kind="l1").score(x, x_ph)
    np.testing.assert_array_equal(maps.anomaly, (x.clamp(0, 1) - x_ph.clamp(0, 1)).abs()[:, 0].numpy())
    assert maps.s1 is None and maps.clahe_x is None
    with pytest.raises(ValueError, match="spatial"):
        AnomalyScorer(None)
    with pytest.raises(ValueError, match="unknown score kind"):
        AnomalyScorer(None, kind="l2")
