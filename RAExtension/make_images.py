"""Makes the extension's icons and the Sample Data thumbnail from the bundled Colin27 head.

    .venv/bin/python RAExtension/make_images.py

Writes RAExtension/RAExtension.png (the Extensions Index icon, 128x128), RAModule/Resources/Icons/RAModule.png (the
module icon, the same picture) and RAModule/Resources/Icons/RAColin27Head.png (the Sample Data thumbnail). The icon
is an axial slice of the sample scan with a heat overlay where `ra demo` puts its synthetic lesion: an emblem, not a
detection result.
"""
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFilter
from scipy.ndimage import binary_fill_holes

from ra_engine.demo import insert_lesion, LESION_CENTRE_LPS
from ra_engine.io.images import read_image

ROOT = Path(__file__).resolve().parent.parent
HEAD = ROOT / "ra_engine" / "resources" / "reference" / "head.nii.gz"
BACKGROUND = (24, 30, 40, 255)


def axial_slice(image, z_mm):
    """The axial slice at LPS z = z_mm as uint8 grey, rows anterior to posterior, columns patient right to left
    (the radiological view Slicer shows)."""
    index = int(round((z_mm - image.geometry.origin[2]) / image.geometry.spacing[2]))
    plane = image.array[index].astype(np.float32)
    return np.clip(plane / np.percentile(plane, 99.5) * 255.0, 0, 255).astype(np.uint8), index


def head_picture(size):
    """The slice through the synthetic lesion's centre, grey, with a heat overlay on the lesion, RGBA (transparent
    outside the head), fitted into a size x size square."""
    image = read_image(HEAD)
    grey, index = axial_slice(image, LESION_CENTRE_LPS[2])
    _, lesion = insert_lesion(image)
    heat = PILImage.fromarray((lesion[index] * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2.5))
    weight = np.asarray(heat, np.float32)[..., None] / 255.0
    colour = colormaps["hot"](0.35 + 0.6 * weight[..., 0])[..., :3] * 255.0
    rgb = grey[..., None].astype(np.float32) * (1.0 - 0.85 * weight) + colour * 0.85 * weight
    head = binary_fill_holes(grey > 20)  # the air around the head is left transparent
    rgba = np.dstack([rgb.astype(np.uint8), (head * 255).astype(np.uint8)])
    picture = PILImage.fromarray(rgba, "RGBA")
    picture.thumbnail((size, size), PILImage.LANCZOS)
    return picture


def icon(size=128):
    """A rounded dark tile with the head picture."""
    tile = PILImage.new("RGBA", (size, size), (0, 0, 0, 0))
    ImageDraw.Draw(tile).rounded_rectangle((0, 0, size - 1, size - 1), radius=size // 6, fill=BACKGROUND)
    picture = head_picture(int(size * 0.86))
    tile.alpha_composite(picture, ((size - picture.width) // 2, (size - picture.height) // 2))
    return tile


def thumbnail(width=260, height=280):
    """The sample scan's axial slice through the middle of the head, grey, on a black background."""
    image = read_image(HEAD)
    grey, _ = axial_slice(image, image.geometry.origin[2] + image.geometry.spacing[2] * image.array.shape[0] * 0.55)
    picture = PILImage.fromarray(grey, "L").convert("RGB")
    picture.thumbnail((width, height), PILImage.LANCZOS)
    canvas = PILImage.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(picture, ((width - picture.width) // 2, (height - picture.height) // 2))
    return canvas


def main():
    emblem = icon()
    for path in (ROOT / "RAExtension" / "RAExtension.png", ROOT / "RAModule" / "Resources" / "Icons" / "RAModule.png"):
        emblem.save(path, optimize=True)
    thumbnail().save(ROOT / "RAModule" / "Resources" / "Icons" / "RAColin27Head.png", optimize=True)


if __name__ == "__main__":
    main()
