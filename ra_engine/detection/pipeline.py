"""Detection on one scan: model-space slices -> pseudo-healthy reconstruction (D(mu), batched, inference mode) ->
anomaly map (`scoring`) -> results mapped back onto the scan's own grid, geometry kept.

Memory: besides the input and the results on the input's grid, detection holds a fixed number of model-space
stacks of the whole scan, (n_slices, H, W) float32 each (the preprocessed slices and masks, the reconstruction and
the anomaly map); their size is set by the model's preset, not by the scan (brain-mri at 128 pixels: 84 slices of
128 x 128, 5.5 MB a stack; xray: one slice). On top of that, one batch at a time: `batch_size` slices
through the network and the scorer (their activations, LPIPS and CLAHE maps), released before the next batch.
No autograd graph is built (inference mode), so a huge scan costs a few copies of its own size (the input, the
results, resampling) plus a bounded amount.
"""
from __future__ import annotations

import numpy as np
import torch

from ra_engine.core.errors import Cancelled, DataError, ModelError
from ra_engine.core.image import Geometry, Image
from ra_engine.core.progress import ProgressFn
from ra_engine.detection.result import Detection
from ra_engine.io.images import to_grey, validate_image
from ra_engine.models.modeldir import RAModel
from ra_engine.preprocess.pipeline import preprocess
from ra_engine.preprocess.space import SliceSet
from ra_engine.scoring.scorer import AnomalyScorer, build_scorer, image_score, score_map


# DICOM Modality values of the images each preset is made for; a DICOM naming another one is refused unless forced.
PRESET_MODALITIES = {"brain-mri": ("MR",), "xray": ("CR", "DX", "RG")}


def scorer_for(model: RAModel, kind: str = "full") -> AnomalyScorer:
    """The anomaly scorer of `kind` with the LPIPS backbone named in the model card, on the model's device."""
    return build_scorer(model.card.lpips_backbone, kind, model.device)


def check_input(model: RAModel, image: Image, force: bool = False) -> None:
    """Raises ModelError when `image` is not what the model is made for: a volume for an xray model (it cannot run
    at all), or a DICOM whose Modality is not the preset's (e.g. CT given to a brain MRI model; `force` lets it run
    anyway). A 2D image given to a brain-mri model is taken as an axial brain slice (`preprocess.slices`), which
    its alignment refuses when it is not one."""
    preset = model.card.preset.name
    name = image.source or "the image"
    shape = image.array.shape
    planar = image.array.ndim == 2 or (image.array.ndim == 3 and shape[0] == 1)
    modality = str(image.metadata.get("modality") or "").upper()
    expected = PRESET_MODALITIES.get(preset, ())
    if preset == "xray" and not planar:
        raise ModelError(f"{name} is a 3D volume {shape}, but the model is an xray model for 2D radiographs: use a "
                         "brain-mri model for head MRI, or give one 2D radiograph")
    if modality and modality not in expected and not force:
        raise ModelError(f"{name} is a DICOM {modality} image, but the model is a {preset} model made for "
                         f"{'/'.join(expected)} images: pass --force (force=True) to run it anyway")


def detect(model: RAModel, image: Image, scorer: AnomalyScorer | None = None, mask: Image | None = None,
           batch_size: int = 8, progress: ProgressFn | None = None, *, force: bool = False) -> Detection:
    """Detects anomalies in one scan or radiograph with its own geometry (`check_input`, then the model card's
    preprocessing, then `detect_slices`).

    image: raw intensities, (z, y, x) or (y, x), LPS geometry. scorer: None builds one from the card (`scorer_for`;
    pass one to reuse it across scans). mask: brain/body mask (non-zero inside) on any grid for brain-mri, on the
    image's grid for xray; None: the reference brain (brain-mri) or the whole radiograph. progress(done, total)
    (slices scored so far and in all) once when the scan is in the model space (done = 0) and after each batch of
    `batch_size` slices; returning False raises `Cancelled`.
    Raises DataError for an unusable image (empty, constant, NaN, failed alignment), ModelError for a model that
    does not fit it."""
    validate_image(image)
    check_input(model, image, force)
    slices = preprocess(image, model.card.preset, mask)
    return detect_slices(model, slices, scorer or scorer_for(model), image.geometry, batch_size=batch_size,
                         progress=progress, source=image.source)


def detect_slices(model: RAModel, slices: SliceSet, scorer: AnomalyScorer, geometry: Geometry, *,
                  batch_size: int = 8, progress: ProgressFn | None = None, source: str = "") -> Detection:
    """Runs the network and the scorer on the model-space `slices` of one scan (those holding brain/body), in
    batches of `batch_size` under inference mode, and maps the results onto the scan's grid; `geometry` is the
    scan's own (LPS). See the module docstring for the memory this needs."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    used = np.flatnonzero(slices.masks.reshape(len(slices), -1).any(1))
    if used.size == 0:
        raise DataError("no slice of the scan holds brain/body in the model space: check the modality and preset")
    if progress is not None and progress(0, used.size) is False:
        raise Cancelled("detection cancelled")
    x_ph = np.zeros_like(slices.images)
    anomaly = np.zeros_like(slices.images)
    with torch.inference_mode():
        for start in range(0, used.size, batch_size):
            rows = used[start:start + batch_size]
            x = torch.from_numpy(slices.images[rows]).unsqueeze(1).to(model.device)
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.amp):
                rec = model.inference_network.reconstruct(x.contiguous(memory_format=torch.channels_last)).float()
            maps = scorer.score(x, rec)
            x_ph[rows] = rec[:, 0].float().cpu().numpy()
            anomaly[rows] = maps.anomaly * slices.masks[rows]
            del x, rec, maps
            if progress is not None and progress(min(start + batch_size, used.size), used.size) is False:
                raise Cancelled("detection cancelled")
    space = slices.space
    to_input = lambda stack, interpolation: space.to_input_grid(stack, interpolation, positions=slices.positions)
    mask_in = to_input(slices.masks.astype(np.uint8), "nearest")
    anomaly_in = to_input(anomaly, "linear")
    np.multiply(anomaly_in, mask_in, out=anomaly_in)  # linear interpolation spills over the mask's edge
    ph_in = space.to_input_intensity_(to_input(x_ph, "linear"))  # in place: no full-size temporaries
    scored = score_map(model.card.image_score, anomaly, slices.images, x_ph)
    slice_scores = [{"position": int(slices.positions[i]), **_reference_z(space, slices.positions[i]),
                     "score": image_score(scored[i], slices.masks[i])} for i in used]
    return Detection(Image(ph_in, geometry, source), Image(anomaly_in, geometry, source),
                     Image(mask_in, geometry, source), slice_scores,
                     image_score(scored[used], slices.masks[used]), slices, anomaly, model.card.calibration,
                     model.card.notice)


def _reference_z(space, position: int) -> dict:
    """{"reference_z_mm": height of model slice `position` in the reference space} for brain-mri (for a 2D slice,
    of the level it was placed at), {} otherwise."""
    if space.kind == "brain-slice":
        return {"reference_z_mm": space.alignment["reference_z_mm"]}
    if space.kind != "brain-mri":
        return {}
    return {"reference_z_mm": round(float(space.geometry.origin[2] + position * space.geometry.spacing[2]), 3)}


def detect_array(model: RAModel, array: np.ndarray, spacing=None, origin=None, direction=None,
                 mask: np.ndarray | Image | None = None, scorer: AnomalyScorer | None = None,
                 progress: ProgressFn | None = None, batch_size: int = 8, force: bool = False) -> Detection:
    """Detection on a numpy scan, for scripting (`ra_engine.detect(model, array, spacing=..., ...)`).

    array: (z, y, x) volume or (y, x) radiograph, raw intensities; a (y, x, 3|4) colour radiograph becomes grey
    (luminance) with a warning for an xray model. spacing, origin: mm, listed (x, y, z) (or (x, y)); direction: the
    row-major D x D matrix of the axes' directions; all in ITK's LPS convention (defaults: 1 mm, 0, identity).
    mask: brain/body mask, an array on the same grid or an Image. Other arguments as for `detect`. Results carry
    exactly this geometry."""
    array = np.asarray(array)
    colour = array.ndim == 3 and array.shape[-1] in (3, 4) and min(array.shape[:2]) > 4
    if colour and model.card.preset.name == "xray":
        array = to_grey(array, f"the {array.shape} array")
    elif colour:
        raise ModelError(f"the array {array.shape} looks like a colour picture, but the model is a brain-mri model "
                         "for 3D head MRI volumes (z, y, x)")
    dimension = array.ndim
    try:
        geometry = Geometry(
            tuple(float(v) for v in np.broadcast_to(1.0 if spacing is None else spacing, dimension)),
            tuple(float(v) for v in np.broadcast_to(0.0 if origin is None else origin, dimension)),
            tuple(float(v) for v in (np.eye(dimension) if direction is None
                                     else np.asarray(direction, float).reshape(dimension, dimension)).ravel()))
    except ValueError as exc:
        raise DataError(f"spacing, origin and direction must have {dimension} values (and {dimension}x{dimension} "
                        f"for direction) for a {dimension}D array {array.shape}: {exc}") from None
    image = Image(np.asarray(array, dtype=np.float32), geometry, "the array")
    if mask is not None and not isinstance(mask, Image):
        mask = Image(np.asarray(mask), geometry, "the mask")
    return detect(model, image, scorer, mask, batch_size=batch_size, progress=progress, force=force)
