"""How much of a lesion brighter than white matter the brain preset's intensity scaling flattens: the synthetic
benchmark's hyperintense lesions (1.2-1.45 x the WM level, benchmarks/brain_set.py) in Colin27, brought into the
64-pixel model space with the high percentile mapped to `headroom` (1 is the paper's): the share of lesion voxels
clipped at 1, the share of normal brain clipped, and the lesion's contrast to the 2 pixels around it (absolute, and
relative to the headroom).

    OMP_NUM_THREADS=1 python benchmarks/headroom.py
"""
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
import brain_set  # noqa: E402
from ra_engine.preprocess.pipeline import preprocess  # noqa: E402
from ra_engine.preprocess.presets import preset_config  # noqa: E402

anatomy = brain_set.colin27()
lesions = [brain_set.hyperintense(anatomy, np.random.default_rng(i), i, 6) for i in range(6)]
for headroom in (1.0, 0.85, 0.75, 0.65):
    config = preset_config("brain-mri", image_size=64, headroom=headroom)
    clipped, rest, contrast = [], [], []
    for lesion in lesions:
        slices = preprocess(lesion.image, config)
        inside = (slices.space.from_input_grid(lesion.mask, "nearest")[slices.positions] > 0) & slices.masks
        ring = ndimage.binary_dilation(inside, iterations=2) & ~inside & slices.masks
        clipped.append(np.mean(slices.images[inside] >= 1.0))
        rest.append(np.mean(slices.images[slices.masks & ~inside] >= 1.0))
        contrast.append(np.median(slices.images[inside]) - np.median(slices.images[ring]))
    print(f"headroom {headroom}: lesion voxels clipped {np.mean(clipped):.0%}, normal brain clipped "
          f"{np.mean(rest):.2%}, contrast {np.mean(contrast):.3f} ({np.mean(contrast) / headroom:.3f} relative)")
