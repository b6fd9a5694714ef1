"""Batched CLAHE in torch: `skimage.exposure.equalize_adapthist(image)` with its defaults, for a stack of images.

`clahe_torch(images)` takes (N, H, W) floating images in [0, 1] on any device and returns what skimage (0.26, the
version this was checked against) returns for each image, as float32: kernel (max(H // 8, 1), max(W // 8, 1)),
clip limit 0.01, 256 bins. Every step of skimage is reproduced with the same arithmetic, so on CPU and CUDA the
result is identical to `equalize_adapthist(image).astype(np.float32)` (not merely close):

1. `img_as_uint`: u = rint(x * 65535) computed in the input's float type, clipped to [0, 65535].
2. `rescale_intensity(u, out_range=(0, 2**14 - 1))` and `np.round`: v = round-half-even(((u - umin) / (umax - umin))
   * 16383) per image, in float64 as skimage computes it. Without float64 (MPS) the same integers come from exact
   integer arithmetic: away from a tie the float64 error (~1e-12) is far below the distance 1 / (2 (umax - umin)) to a
   half-integer, and at all 215051 exact ties (u - umin, umax - umin <= 65535) float64 lands exactly on the half
   (checked exhaustively), so round-half-even of the exact quotient is skimage's result. A constant image keeps
   v = min(u, 16383), as skimage's clip does.
3. Bins: b = v // (1 + 16384 // 256) = v // 65 (so bins 0..252 of the 256 are used).
4. Tiles of kh x kw pixels starting at pixel (0, 0); the last row/column of tiles extends past the image into numpy's
   "reflect" padding (d c b | a b c d | c b a). One histogram of 256 bins per tile: a single bincount over
   (image, tile, bin).
5. Clip limit L = int(max(0.01 * kh * kw, 1)); skimage's `clip_histogram` step by step on all tiles at once: clip,
   the uniform increment (with its "mid" pass, evaluated after the increment as skimage does), then its
   redistribution loop (passes over index 0..255 adding 1 to the under-limit bins of index::step, step =
   max(1, #under // excess), until the excess is used up or a pass changes nothing), run in lockstep over the tiles
   that still have excess; finished tiles drop out (on real images nearly all finish at index 0, the rest within a
   few indices).
6. Maps: int(min(cumsum * (16383 / (kh kw)), 16383)), float64 as in skimage, through a table over cumsum built on the
   host with numpy (so the device never needs float64 for it).
7. Bilinear interpolation between the maps of the four neighbouring tiles, with skimage's block convention (half a
   kernel of leading padding, edge-replicated maps at the borders): each term float64(map * weight) rounded to
   float32, the four summed in float32 in skimage's order, then truncated to an integer as skimage's
   `astype(uint16)` does. When every weight is exactly a float32 (kernels whose sides are powers of two, e.g. 8 and
   16 for 64 and 128 pixel images), the float64 product is exact and a float32 product rounds to the same term, so
   float32 is used.
8. The final `rescale_intensity` to the result's own range, in float32 (for float64 input skimage divides in float64;
   rounding that to float32 gives the same value, double rounding being innocuous for a quotient of integers below
   2**24). A constant result is clipped to [0, 1], as skimage does.

Devices: integer and float32 tensor ops, plus float64 in steps 2 and 7 (step 7 only for kernels that are not powers of
two). On devices without float64 (MPS) `exact` defaults to False: step 2 is then exact integer arithmetic (same
result) and step 7 multiplies in float32 for every kernel size: for kernels that are powers of two (64, 128 pixels)
the result is still identical; for other sizes a pixel's 14-bit level may be off by one where the four terms sum to
nearly an integer, which moves the output by 1 / (the result's range in levels) (measured on noise: up to 1.2e-4, in
0.3-7% of the pixels for 100x130 and 96x96). The CPU can run that path too (`exact=False`). Host syncs: the input range check and the redistribution loop's checks (one per index
step while tiles remain), nothing per pixel or tile.

Out of range values: like skimage, values below 0 (down to -1) become 0, values above 1 (or below -1) raise
ValueError; NaN raises ValueError too (skimage would silently produce garbage). Float16/bfloat16 inputs are converted
to float32 first (skimage would multiply a float16 image by 65535 in float16).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["clahe_torch", "kernel_size_for"]

NR_OF_GRAY = 2 ** 14
NBINS = 256
CLIP_LIMIT = 0.01


def kernel_size_for(height: int, width: int) -> tuple[int, int]:
    """skimage's default kernel_size: 1/8 of each dimension, at least 1."""
    return max(height // 8, 1), max(width // 8, 1)


def _reflect_index(n: int, length: int, device: torch.device) -> torch.Tensor:
    """Source indices of positions 0..length-1 of a line of n values extended past its end with numpy's "reflect"
    padding (no edge repeat: a b c d | c b a ...), periodic for extensions longer than the line."""
    i = torch.arange(length, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i % period
    return torch.where(i >= n, period - i, i)


def _bins(images: torch.Tensor, float64: bool, dtype: torch.dtype) -> torch.Tensor:
    """Steps 1-3: (N, H, W) float -> histogram bins in [0, 252] (integer type dtype), per image, as skimage's
    `img_as_uint`, then `rescale_intensity(out_range=(0, 16383))` and `np.round`, then `// 65`. float64: do step 2 in
    float64 as skimage does; otherwise in exact integer arithmetic (the same integers, see the module docstring)."""
    n = images.shape[0]
    # img_as_uint: multiply in the input's float type (float32 or float64), rint (half to even), clip; exact integers.
    u = torch.round(images * 65535).clamp_(0, 65535)
    flat = u.view(n, -1)
    umin = flat.amin(1).view(n, 1, 1)  # (amin and amax: much faster than aminmax(dim=1) on CPU)
    span = flat.amax(1).view(n, 1, 1) - umin
    constant = span == 0
    if float64:
        # ((u - umin) / span) * 16383, rounded half to even; a constant image: min(u, 16383), written as
        # ((u - 0) / 1) * 1 clipped to 16383 so that one expression does both.
        shift = torch.where(constant, torch.zeros_like(umin), umin).double()
        div = torch.where(constant, torch.ones_like(span), span).double()
        scale = torch.where(constant, 1.0, float(NR_OF_GRAY - 1)).double()
        v = u.double().sub_(shift).div_(div).mul_(scale).round_().clamp_(max=NR_OF_GRAY - 1)
        return v.div_(1 + NR_OF_GRAY // NBINS).floor_().to(dtype)
    u = u.to(torch.int64)
    umin = umin.to(torch.int64)
    span = span.to(torch.int64)
    d = torch.where(constant, torch.ones_like(span), span)
    num = (u - umin) * (NR_OF_GRAY - 1)
    q = torch.div(num, d, rounding_mode="floor")
    r2 = 2 * (num - q * d)
    q += (r2 > d) | ((r2 == d) & (q % 2 == 1))  # round half to even
    v = torch.where(constant, u.clamp(max=NR_OF_GRAY - 1), q)
    return torch.div(v, 1 + NR_OF_GRAY // NBINS, rounding_mode="floor").to(dtype)


def _clip_histograms(hist: torch.Tensor, limit: int, kernel_elements: int) -> torch.Tensor:
    """skimage's `clip_histogram(hist, limit)` on each row of hist (T, B) (an integer type; every row sums to
    kernel_elements), batched over the rows; modifies and returns hist."""
    nbins = hist.shape[1]
    device = hist.device
    hist.clamp_(max=limit)
    n_excess = kernel_elements - hist.sum(1)  # int64
    # The uniform increment and the "mid" pass, only on the rows where the increment is not 0 (for the others
    # nothing changes: no bin is below upper = limit by the increment, and none in [limit, limit)).
    bin_incr = torch.div(n_excess, nbins, rounding_mode="floor")
    rows = torch.nonzero(bin_incr > 0).squeeze(1)
    if rows.numel():
        h = hist.index_select(0, rows)
        incr = bin_incr.index_select(0, rows)[:, None]
        upper = limit - incr
        low = h < upper
        n_excess.index_add_(0, rows, -(low.sum(1) * incr[:, 0]))
        h += low * incr.to(h.dtype)
        mid = (h >= upper) & (h < limit)  # after the increment, as in skimage
        n_excess.index_add_(0, rows, -((limit - h) * mid).sum(1))
        h.masked_fill_(mid, limit)
        hist.index_copy_(0, rows, h)

    # The redistribution loop. Rows with excess left run it in lockstep: within a pass, all are at the same index;
    # a row leaves when its excess is used up (<= 0), or at the end of a pass that changed nothing. The first step
    # (index 0) runs in place on all the rows, where most rows finish. The bins of a step, index::step, come from a
    # table: pattern[s, nbins - index + j] = (j >= index and (j - index) % s == 0); step <= #under <= nbins.
    c = torch.arange(2 * nbins, device=device) - nbins
    s = torch.arange(nbins + 1, device=device).clamp_(min=1)[:, None]
    pattern = (c >= 0) & (c.remainder(s) == 0)  # (nbins + 1, 2 * nbins)
    active = n_excess > 0
    prev = n_excess.clone()
    under = (hist < limit) & active[:, None]
    step = torch.div(under.sum(1), n_excess.clamp(min=1), rounding_mode="floor").clamp_(min=1)
    sel = under & pattern.index_select(0, step)[:, nbins:]
    hist += sel
    n_excess -= sel.sum(1)
    rows = torch.nonzero(n_excess > 0).squeeze(1)
    if rows.numel() == 0:
        return hist
    h = hist.index_select(0, rows)
    m = n_excess.index_select(0, rows)
    prev = prev.index_select(0, rows)
    start = 1
    while True:
        for index in range(start, nbins):
            under = h < limit
            step = torch.div(under.sum(1), m, rounding_mode="floor").clamp_(min=1)
            sel = under & pattern.index_select(0, step)[:, nbins - index:2 * nbins - index]
            h += sel
            m -= sel.sum(1)
            done = m <= 0
            if bool(done.any()):
                hist.index_copy_(0, rows[done], h[done])
                keep = ~done
                rows, h, m, prev = rows[keep], h[keep], m[keep], prev[keep]
                if rows.numel() == 0:
                    return hist
        start = 0
        stalled = m == prev
        if bool(stalled.any()):
            hist.index_copy_(0, rows[stalled], h[stalled])
            keep = ~stalled
            rows, h, m = rows[keep], h[keep], m[keep]
            if rows.numel() == 0:
                return hist
        prev = m.clone()


def _map_lut(kernel_elements: int) -> np.ndarray:
    """skimage's `map_histogram` as a table over the cumulative count c = 0..K+1 (larger counts map like K+1):
    int(min(float64(c) * (16383 / K), 16383))."""
    c = np.arange(kernel_elements + 2).astype(float)
    c *= (NR_OF_GRAY - 1) / kernel_elements
    np.clip(c, a_min=None, a_max=NR_OF_GRAY - 1, out=c)
    return c.astype(int)


def _axis_interp(size: int, k: int, n_tiles: int):
    """Per pixel along one axis: the tile index of the lower and upper neighbouring maps, and their weights, as
    skimage computes them (block = (i + k // 2) // k, offset = (i + k // 2) % k, coefficient offset / k in float64,
    the maps of blocks -1 and n_tiles replicated from the edge). numpy arrays."""
    pos = np.arange(size) + k // 2
    block, offset = pos // k, pos % k
    coeff = (np.arange(k) / k)[offset]
    return (np.clip(block - 1, 0, n_tiles - 1), np.clip(block, 0, n_tiles - 1)), (1 - coeff, coeff)


@torch.no_grad()
def clahe_torch(images: torch.Tensor, *, exact: bool | None = None) -> torch.Tensor:
    """`skimage.exposure.equalize_adapthist(image)` (default kernel size, clip limit 0.01, 256 bins) of each image of
    a batch, identical to skimage's result rounded to float32.

    images: (N, H, W) floating tensor (float32 or float64; float16/bfloat16 are converted to float32), values in
    [0, 1] (values in [-1, 0) count as 0, as in skimage; values beyond [-1, 1] or NaN raise ValueError), on any device.
    Returns (N, H, W) float32 on the same device, each image rescaled to its own range [0, 1]. A constant image gives
    all ones where the kernel's sides are powers of two (64x64, 128x128 images); for other sizes skimage's rounding
    of the interpolation weights gives a pattern of 0s and 1s, reproduced here.

    exact: use float64 where skimage does (default: yes, unless the device is MPS, which has no float64); without it
    the result is the same for 64x64 and 128x128 images (any kernel whose sides are powers of two) and may differ by
    ~1e-4 in some pixels for other sizes (module docstring)."""
    if images.ndim != 3:
        raise ValueError(f"clahe_torch takes (N, H, W) images; got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"clahe_torch takes floating images in [0, 1]; got {images.dtype}")
    if images.dtype not in (torch.float32, torch.float64):
        images = images.to(torch.float32)
    images = images.contiguous()
    device = images.device
    if exact is None:
        exact = device.type != "mps"
    n, height, width = images.shape
    if images.numel() == 0:
        return torch.zeros(images.shape, dtype=torch.float32, device=device)
    low, high = (float(v) for v in torch.aminmax(images))
    if not (low >= -1 and high <= 1):  # NaN fails both
        raise ValueError(f"Images of type float must be between -1 and 1 (clahe_torch: got values in [{low}, {high}])")

    kh, kw = kernel_size_for(height, width)
    nh, nw = -(-height // kh), -(-width // kw)  # tiles per axis: ceil(size / kernel)
    ntiles = nh * nw
    kernel_elements = kh * kw
    # Indices into the (image, tile, bin) tables: int32 where they fit (about twice as fast as int64 on CPU).
    index_dtype = torch.int32 if n * ntiles * NBINS < 2 ** 31 else torch.int64
    as_index = lambda a: torch.as_tensor(a, dtype=index_dtype, device=device)

    bins = _bins(images, exact, index_dtype)  # (N, H, W)
    image_offset = as_index(np.arange(n).reshape(n, 1, 1) * (ntiles * NBINS))

    # Histograms of the tiles (kh x kw pixels from (0, 0); past the image's end, numpy's reflect padding), one
    # bincount over (image, tile, bin).
    if height == nh * kh and width == nw * kw:
        ext = bins
    else:
        ext = bins.index_select(1, _reflect_index(height, nh * kh, device))
        ext = ext.index_select(2, _reflect_index(width, nw * kw, device))
    tile_offset = as_index(((np.arange(nh * kh) // kh)[:, None] * nw + (np.arange(nw * kw) // kw)[None, :]) * NBINS)
    hist_index = (ext + tile_offset).add_(image_offset)
    hist = torch.bincount(hist_index.view(-1), minlength=n * ntiles * NBINS).view(n * ntiles, NBINS)
    del ext, hist_index
    hist = hist.to(torch.int16 if kernel_elements < 2 ** 15 else torch.int32)

    limit = int(np.clip(CLIP_LIMIT * kernel_elements, 1, None)) if CLIP_LIMIT > 0 else kernel_elements
    hist = _clip_histograms(hist, limit, kernel_elements)
    cum = torch.cumsum(hist, 1, dtype=torch.int32).clamp_(max=kernel_elements + 1)
    # The map values are integers <= 16383, exact in float32.
    lut = torch.as_tensor(_map_lut(kernel_elements), dtype=torch.float32, device=device)
    maps = lut.index_select(0, cum.view(-1))  # (N * ntiles * NBINS,)
    del hist, cum

    # Interpolation between the four neighbouring maps of each pixel: each term float64(map * weight) rounded to
    # float32, the four summed in float32 in skimage's order ((y0, x0), (y0, x1), (y1, x0), (y1, x1)). The weights
    # are skimage's float64 products (x coefficient times y coefficient). When every weight is exactly a float32
    # (kernel sizes that are powers of two: 8 and 16 for 64 and 128 pixels), map * weight is exact in float64, so a
    # float32 product gives the same rounded term and float64 is not needed.
    (y_tiles, y_weights) = _axis_interp(height, kh, nh)
    (x_tiles, x_weights) = _axis_interp(width, kw, nw)
    weights = [wx[None, :] * wy[:, None] for wy in y_weights for wx in x_weights]
    float64 = exact and not all(np.array_equal(w.astype(np.float32), w) for w in weights)
    wdtype = torch.float64 if float64 else torch.float32
    base = bins.add_(image_offset).view(n, -1)
    gathered = torch.empty((n, height, width), dtype=torch.float32, device=device)
    wide = torch.empty((n, height, width), dtype=wdtype, device=device) if float64 else gathered
    term = torch.empty((n, height, width), dtype=torch.float32, device=device)
    index = torch.empty(base.shape, dtype=index_dtype, device=device)
    result = None
    edges = [(ty, tx) for ty in y_tiles for tx in x_tiles]
    for (ty, tx), weight in zip(edges, weights):
        offset = as_index((ty[:, None] * nw + tx[None, :]).reshape(-1) * NBINS)
        torch.index_select(maps, 0, torch.add(base, offset, out=index).view(-1), out=gathered.view(-1))
        if float64:
            wide.copy_(gathered)
        weight = torch.as_tensor(weight, dtype=wdtype, device=device)
        if result is None:
            result = torch.mul(wide, weight, out=torch.empty_like(term))
        else:
            result += torch.mul(wide, weight, out=term)
    levels = result.trunc_()  # skimage's astype(uint16): truncation; exact integers in float32 from here

    # Final rescale_intensity of each image to its own range, in float32; a constant result is clipped to [0, 1]:
    # (levels - (lmin - clip(lmin, 0, 1))) / 1 gives that with the same expression.
    flat = levels.view(n, -1)
    lmin = flat.amin(1).view(n, 1, 1)
    span = flat.amax(1).view(n, 1, 1) - lmin
    constant = span == 0
    shift = torch.where(constant, lmin - lmin.clamp(0, 1), lmin)
    return levels.sub_(shift).div_(torch.where(constant, torch.ones_like(span), span))
