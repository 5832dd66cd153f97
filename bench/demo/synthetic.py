"""Deterministic synthetic defects on RGB images.

Every generator takes an RGB ``uint8`` image ``[H, W, 3]`` and a seeded
:class:`numpy.random.Generator` and returns ``(defective_image, mask)``: a new ``uint8``
image of the same shape and a boolean ``[H, W]`` mask that is ``True`` exactly on the
pixels the defect touches (soft edges are kept *inside* the mask, so no pixel outside it
changes). The same image and the same generator state give the same bytes on every run.

The generators know nothing about any dataset; they size themselves relative to the
image (a scratch on a 64 px image is 1-2 px wide, on a 512 px image proportionally wider)
and pick their colour against the local content so that the defect is visible.

* :func:`scratch`   - a thin curved line (quadratic Bezier), lighter or darker than its
  surroundings;
* :func:`hole`      - a dark ellipse with a lighter (or darker) rim;
* :func:`stain`     - a blurred, irregular blob of colour;
* :func:`crack`     - a dark, jagged, branching random walk;
* :func:`cut_paste` - a patch cut from elsewhere in the same (or a donor) image, altered
  in brightness/colour and pasted with a soft edge.

:data:`DEFECTS` maps the defect names used in file layouts to the generators and
:func:`apply_defect` / :func:`random_defect` dispatch on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "DEFECTS", "apply_defect", "crack", "cut_paste", "hole", "random_defect", "scratch", "stain",
]

#: Colours (RGB in [0, 1]) that stains are drawn from.
STAIN_COLOURS = np.array([
    [0.40, 0.24, 0.10],  # coffee brown
    [0.62, 0.30, 0.08],  # rust
    [0.08, 0.08, 0.10],  # soot
    [0.22, 0.40, 0.12],  # mould green
    [0.10, 0.20, 0.62],  # blue ink
    [0.85, 0.78, 0.22],  # yellow oil
    [0.92, 0.92, 0.88],  # white paint
    [0.55, 0.05, 0.12],  # red wine
])


# -- helpers --------------------------------------------------------------------------

def _check(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {img.dtype} {img.shape}")
    return img.astype(np.float64) / 255.0


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _scale(img: np.ndarray) -> float:
    return min(img.shape[0], img.shape[1]) / 64.0


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _local_mean(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean colour of the image around ``mask`` (the mask dilated generously)."""
    grown = ndimage.binary_dilation(mask, iterations=max(2, int(3 * _scale(img))))
    return img[grown].mean(axis=0) if grown.any() else img.reshape(-1, 3).mean(axis=0)


def _contrast_tone(local: np.ndarray, rng: np.random.Generator, dark: tuple[float, float],
                   light: tuple[float, float]) -> np.ndarray:
    """A grey tone far from the local brightness: dark on light ground, light on dark."""
    if float(_luma(local)) > 0.42:
        v = rng.uniform(*dark)
    else:
        v = rng.uniform(*light)
    return np.array([v, v, v])


def _composite(img: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return img * (1.0 - a) + colour * a


def _raster_path(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of the pixels a dense polyline passes through."""
    mask = np.zeros(shape, dtype=bool)
    if len(points) < 2:
        return mask
    # resample so consecutive samples are at most 0.5 px apart
    seg = np.diff(points, axis=0)
    length = np.hypot(seg[:, 0], seg[:, 1]).sum()
    n = max(2, int(np.ceil(length * 2)) + 1)
    cum = np.concatenate([[0.0], np.cumsum(np.hypot(seg[:, 0], seg[:, 1]))])
    t = np.linspace(0.0, cum[-1], n)
    ys = np.interp(t, cum, points[:, 0])
    xs = np.interp(t, cum, points[:, 1])
    r = np.rint(ys).astype(int)
    c = np.rint(xs).astype(int)
    ok = (r >= 0) & (r < shape[0]) & (c >= 0) & (c < shape[1])
    mask[r[ok], c[ok]] = True
    return mask


def _thicken(mask: np.ndarray, width: int) -> np.ndarray:
    if width <= 1:
        return mask
    out = mask.copy()
    for _ in range(width - 1):
        out = ndimage.binary_dilation(out, structure=np.ones((2, 2), dtype=bool))
    return out


def _ensure_nonempty(mask: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    if mask.any():
        return mask
    m = np.zeros(shape, dtype=bool)
    r, c = shape[0] // 2, shape[1] // 2
    m[r - 1:r + 2, c - 1:c + 2] = True
    return m


# -- defects --------------------------------------------------------------------------

def scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin curved line, clearly lighter or darker than what it crosses."""
    f = _check(img)
    h, w = f.shape[:2]
    s = _scale(f)
    size = min(h, w)
    length = rng.uniform(0.35, 0.75) * size
    theta = rng.uniform(0, np.pi)
    centre = np.array([rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w])
    d = np.array([np.sin(theta), np.cos(theta)]) * length / 2
    p0, p2 = centre - d, centre + d
    normal = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-9)
    p1 = centre + normal * rng.uniform(-0.35, 0.35) * length
    t = np.linspace(0.0, 1.0, 64)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    width = int(rng.integers(1, 3)) if s < 1.5 else max(1, int(round(rng.uniform(1, 2.2) * s)))
    mask = _ensure_nonempty(_thicken(_raster_path(pts, (h, w)), width), (h, w), rng)
    tone = _contrast_tone(_local_mean(f, mask), rng, dark=(0.02, 0.15), light=(0.85, 1.0))
    alpha = mask * rng.uniform(0.8, 0.95)
    return _to_uint8(_composite(f, tone, alpha)), mask


def hole(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark elliptical hole with a rim (raised lighter or burnt darker)."""
    from skimage.draw import ellipse

    f = _check(img)
    h, w = f.shape[:2]
    s = _scale(f)
    size = min(h, w)
    ra = rng.uniform(0.05, 0.12) * size
    rb = ra * rng.uniform(0.6, 1.0)
    rim = max(1, int(round(rng.uniform(1.0, 2.0) * s)))
    margin = ra + rim + 1
    cy = rng.uniform(margin, h - margin)
    cx = rng.uniform(margin, w - margin)
    rot = rng.uniform(-np.pi, np.pi)
    inner = np.zeros((h, w), dtype=bool)
    rr, cc = ellipse(cy, cx, ra, rb, shape=(h, w), rotation=rot)
    inner[rr, cc] = True
    inner = _ensure_nonempty(inner, (h, w), rng)
    mask = ndimage.binary_dilation(inner, iterations=rim)
    ring = mask & ~inner
    out = f.copy()
    # interior: near black with a little shading towards one side (depth)
    yy, xx = np.mgrid[0:h, 0:w]
    shade = ((yy - cy) * np.sin(rot) + (xx - cx) * np.cos(rot)) / (ra + 1e-9)
    depth = np.clip(rng.uniform(0.02, 0.08) + 0.05 * shade, 0.0, 0.2)
    out[inner] = depth[inner][:, None] * np.array([1.0, 0.95, 0.9])
    local = _local_mean(f, mask)
    if float(_luma(local)) < 0.35 or rng.random() < 0.5:
        rim_colour = np.clip(local * 0.4 + 0.55, 0, 1)  # raised, light burr
    else:
        rim_colour = local * 0.35  # burnt, darker edge
    out[ring] = f[ring] * 0.25 + rim_colour * 0.75
    return _to_uint8(out), mask


def stain(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A blurred, irregular blob of colour (soft edge inside the mask)."""
    from skimage.draw import ellipse

    f = _check(img)
    h, w = f.shape[:2]
    s = _scale(f)
    size = min(h, w)
    blob = np.zeros((h, w))
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
    base = rng.uniform(0.07, 0.14) * size
    for _ in range(int(rng.integers(2, 5))):
        oy, ox = rng.normal(0, base * 0.6, size=2)
        ra = base * rng.uniform(0.5, 1.1)
        rb = ra * rng.uniform(0.5, 1.0)
        rr, cc = ellipse(cy + oy, cx + ox, ra, rb, shape=(h, w), rotation=rng.uniform(-np.pi, np.pi))
        blob[rr, cc] = 1.0
    if not blob.any():
        blob[int(cy), int(cx)] = 1.0
    soft = ndimage.gaussian_filter(blob, sigma=1.5 * s)
    soft /= soft.max()
    alpha = np.clip((soft - 0.2) / 0.5, 0.0, 1.0)
    alpha[alpha < 0.12] = 0.0
    mask = alpha > 0
    local = _local_mean(f, mask)
    cand = STAIN_COLOURS[rng.choice(len(STAIN_COLOURS), size=3, replace=False)]
    colour = cand[int(np.argmax(np.abs(cand - local).sum(axis=1)))]
    strength = rng.uniform(0.6, 0.85)
    # stains darken/tint multiplicatively a bit too, so texture still shows through
    tinted = f * (0.5 + 0.5 * colour) * 0.5 + colour * 0.5
    a = (alpha * strength)[..., None]
    out = f * (1 - a) + tinted * a
    return _to_uint8(out), mask


def crack(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A jagged, branching random walk, darker (or on dark ground lighter) than its surroundings."""
    f = _check(img)
    h, w = f.shape[:2]
    s = _scale(f)
    size = min(h, w)

    def walk(start: np.ndarray, heading: float, steps: int) -> np.ndarray:
        pts = [start]
        p = start.copy()
        for _ in range(steps):
            heading += rng.normal(0.0, 0.28)
            p = p + np.array([np.sin(heading), np.cos(heading)]) * s
            pts.append(p)
        return np.array(pts)

    start = np.array([rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w])
    heading = rng.uniform(-np.pi, np.pi)
    n = int(rng.uniform(0.25, 0.45) * size / s)
    # grow in both directions from the start point
    main = np.concatenate([walk(start, heading + np.pi, n)[::-1], walk(start, heading, n)[1:]])
    mask = _raster_path(main, (h, w))
    width = 2 if rng.random() < 0.35 else 1
    mask = _thicken(mask, max(1, int(round(width * s))))
    for _ in range(int(rng.integers(1, 4))):
        at = main[int(rng.integers(len(main) // 4, 3 * len(main) // 4))]
        branch = walk(at, heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), int(n * rng.uniform(0.3, 0.6)))
        mask |= _thicken(_raster_path(branch, (h, w)), max(1, int(round(s))))
    mask = _ensure_nonempty(mask, (h, w), rng)
    tone = _contrast_tone(_local_mean(f, mask), rng, dark=(0.0, 0.1), light=(0.8, 0.95))
    alpha = mask * rng.uniform(0.8, 0.95)
    return _to_uint8(_composite(f, tone, alpha)), mask


def cut_paste(img: np.ndarray, rng: np.random.Generator,
              donor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paste a patch cut from elsewhere (in ``img`` or in ``donor``) with a soft edge.

    The patch is flipped/rotated and its brightness or colour is shifted so that it does
    not blend in; the soft edge ramps inside the pasted rectangle, which is the mask.
    """
    f = _check(img)
    src = f if donor is None else _check(donor)
    h, w = f.shape[:2]
    s = _scale(f)
    ph = int(np.clip(rng.uniform(0.16, 0.32) * h, 3, h - 2))
    pw = int(np.clip(rng.uniform(0.16, 0.32) * w, 3, w - 2))
    side = max(ph, pw)
    if side >= min(src.shape[0], src.shape[1]):
        side = min(src.shape[0], src.shape[1]) - 1
    ty, tx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    # source location far from the target location when cutting from the same image
    for _ in range(20):
        sy = int(rng.integers(0, src.shape[0] - side + 1))
        sx = int(rng.integers(0, src.shape[1] - side + 1))
        if donor is not None or abs(sy - ty) + abs(sx - tx) > 0.3 * min(h, w):
            break
    patch = src[sy:sy + side, sx:sx + side]
    patch = np.rot90(patch, k=int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    patch = patch[:ph, :pw].copy()
    if rng.random() < 0.5:
        factor = rng.choice([rng.uniform(0.55, 0.8), rng.uniform(1.25, 1.6)])
        patch = np.clip(patch * factor, 0, 1)
    else:
        patch = np.clip(patch[..., rng.permutation(3)] * rng.uniform(0.85, 1.15), 0, 1)
        if np.abs(patch - f[ty:ty + ph, tx:tx + pw]).mean() < 0.08:
            patch = np.clip(1.0 - patch, 0, 1)
    ramp = max(1.0, 1.5 * s)
    yy = np.arange(ph)[:, None]
    xx = np.arange(pw)[None, :]
    edge = np.minimum(np.minimum(yy + 1, ph - yy), np.minimum(xx + 1, pw - xx))
    alpha = np.clip(edge / (ramp + 1.0), 0.0, 1.0)
    out = f.copy()
    region = out[ty:ty + ph, tx:tx + pw]
    out[ty:ty + ph, tx:tx + pw] = region * (1 - alpha[..., None]) + patch * alpha[..., None]
    mask = np.zeros((h, w), dtype=bool)
    mask[ty:ty + ph, tx:tx + pw] = True
    return _to_uint8(out), mask


DefectFn = Callable[..., tuple[np.ndarray, np.ndarray]]

#: Defect name -> generator. Names are the folder names used in MVTec-style layouts.
DEFECTS: dict[str, DefectFn] = {
    "scratch": scratch,
    "hole": hole,
    "stain": stain,
    "crack": crack,
    "cut": cut_paste,
}


def apply_defect(kind: str, img: np.ndarray, rng: np.random.Generator,
                 donor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Apply the defect named ``kind`` (a key of :data:`DEFECTS`)."""
    if kind not in DEFECTS:
        raise KeyError(f"unknown defect '{kind}'; known: {sorted(DEFECTS)}")
    if kind == "cut":
        return cut_paste(img, rng, donor=donor)
    return DEFECTS[kind](img, rng)


def random_defect(img: np.ndarray, rng: np.random.Generator,
                  kinds: Sequence[str] = tuple(DEFECTS),
                  donor: np.ndarray | None = None) -> tuple[str, np.ndarray, np.ndarray]:
    """Pick a defect kind uniformly from ``kinds`` and apply it: ``(kind, image, mask)``."""
    kind = str(kinds[int(rng.integers(len(kinds)))])
    out, mask = apply_defect(kind, img, rng, donor=donor)
    return kind, out, mask
