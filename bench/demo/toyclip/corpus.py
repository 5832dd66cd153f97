"""The toy CLIP's pre-training corpus: procedural images and scikit-image photo crops,
each clean and with synthetic defects (:mod:`bench.demo.synthetic`), with exact masks and
captions (:func:`build_corpus`, deterministic from its seed)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from bench.demo import synthetic
from bench.demo.toyclip.arch import IMAGE_SIZE
from bench.demo.toyclip.words import (
    ANOMALOUS_STATES,
    COLOURS,
    CORPUS_SOURCES,
    DEFECT_WORDS,
    HELD_OUT_SOURCES,
    NORMAL_STATES,
    PROCEDURAL,
    TEMPLATES,
    _sentence,
)

# -- corpus ------------------------------------------------------------------------------

def _load_skimage(name: str) -> np.ndarray | list[np.ndarray]:
    import skimage.data

    if name in HELD_OUT_SOURCES:
        raise ValueError(f"'{name}' is held out for the demo target and must not enter the corpus")
    loader = getattr(skimage.data, name)
    # binary_blobs is generated at random unless seeded
    img = loader(rng=0) if name == "binary_blobs" else loader()
    if name == "stereo_motorcycle":
        img = img[0]
    if name == "lfw_subset":
        return [np.clip(np.rint(f * 255), 0, 255).astype(np.uint8) for f in img]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        img = np.clip(np.rint(img * 255.0 if img.max() <= 1.0 else img), 0, 255).astype(np.uint8)
    if img.ndim == 3:
        img = img[..., :3]
    return img


def _resize(img: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((size, size),
                                                                       Image.Resampling.BICUBIC))


def _rgb(img: np.ndarray) -> np.ndarray:
    return np.stack([img] * 3, axis=-1) if img.ndim == 2 else img


class _PhotoSampler:
    def __init__(self) -> None:
        self.sources = {name: _load_skimage(name) for name in CORPUS_SOURCES}
        self.names = sorted(self.sources)

    def sample(self, rng: np.random.Generator, mosaic_p: float = 0.0,
               recolour_p: float = 0.0) -> tuple[np.ndarray, str]:
        """One photo crop (with probability ``mosaic_p`` two, joined along a line)."""
        img, phrase = self._crop(rng, recolour_p)
        if mosaic_p > 0 and rng.random() < mosaic_p:
            other, phrase2 = self._crop(rng, recolour_p)
            yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
            theta = rng.uniform(0, 2 * np.pi)
            offset = rng.uniform(-0.25, 0.25) * IMAGE_SIZE
            side = ((xx - IMAGE_SIZE / 2) * np.cos(theta) + (yy - IMAGE_SIZE / 2) * np.sin(theta)) > offset
            img = np.where(side[..., None], img, other)
            phrase = f"{phrase} and {phrase2}"
        return img, phrase

    def _crop(self, rng: np.random.Generator, recolour_p: float) -> tuple[np.ndarray, str]:
        name = self.names[int(rng.integers(len(self.names)))]
        src = self.sources[name]
        if isinstance(src, list):
            src = src[int(rng.integers(len(src)))]
            lo, hi = 0.75, 1.0
        elif name in ("brick", "grass", "gravel", "moon", "hubble_deep_field"):
            lo, hi = 0.15, 0.45
        else:
            lo, hi = 0.25, 0.8
        h, w = src.shape[:2]
        side = max(8, int(min(h, w) * rng.uniform(lo, hi)))
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crop = src[y:y + side, x:x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        img = _resize(_rgb(crop)).astype(np.float64)
        phrase = CORPUS_SOURCES[name][int(rng.integers(len(CORPUS_SOURCES[name])))]
        colour = ""
        if src.ndim == 2 and rng.random() < 0.6:  # tint grey photos with a named colour
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            tint = np.asarray(COLOURS[colour], dtype=np.float64) / 255.0
            img = img * (0.35 + 0.65 * tint)
            if colour in ("black", "grey"):
                colour = ""
        elif recolour_p > 0 and rng.random() < recolour_p:
            if src.ndim == 2:  # duotone: grey levels mapped between two colours
                ca, cb = (np.asarray(COLOURS[list(COLOURS)[int(i)]], dtype=np.float64)
                          for i in rng.choice(len(COLOURS), size=2, replace=False))
                t = img[..., :1] / 255.0
                img = cb * (1 - t) + ca * t
            else:  # hue rotation and saturation change
                from skimage.color import hsv2rgb, rgb2hsv

                hsv = rgb2hsv(np.clip(img, 0, 255) / 255.0)
                hsv[..., 0] = np.mod(hsv[..., 0] + rng.uniform(0, 1), 1.0)
                hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.6, 1.5), 0, 1)
                img = hsv2rgb(hsv) * 255.0
        img = img * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15)
        out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        return out, f"{colour} {phrase}".strip()


def _procedural(rng: np.random.Generator, natural_p: float = 0.0) -> tuple[np.ndarray, str]:
    """One procedural pattern image in two named colours, and its phrase.

    With probability ``natural_p`` a natural-like image instead: a dead-leaves collage or
    1/f "clouds".
    """
    from skimage.draw import disk, polygon

    s = IMAGE_SIZE
    names = list(COLOURS)
    ia, ib = rng.choice(len(names), size=2, replace=False)
    a, b = names[int(ia)], names[int(ib)]
    ca = np.asarray(COLOURS[a], dtype=np.float64) / 255.0
    cb = np.asarray(COLOURS[b], dtype=np.float64) / 255.0
    if natural_p > 0 and rng.random() < natural_p:
        kind = "shapes" if rng.random() < 0.65 else "clouds"
    else:
        kind = list(PROCEDURAL)[int(rng.integers(len(PROCEDURAL) - 2))]
    if kind == "shapes":
        return _dead_leaves(rng), PROCEDURAL[kind]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    period = rng.uniform(5, 16)
    if kind == "stripes":
        t = (np.mod(u, period) < period * rng.uniform(0.3, 0.7)).astype(float)
    elif kind == "grid":
        w = rng.integers(1, 3)
        t = ((np.mod(xx, period) < w) | (np.mod(yy, period) < w)).astype(float)
    elif kind == "checkerboard":
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(float)
    elif kind == "dots":
        r = period * rng.uniform(0.15, 0.35)
        t = ((np.mod(xx, period) - period / 2) ** 2 + (np.mod(yy, period) - period / 2) ** 2 < r * r)
        t = t.astype(float)
    elif kind == "noise":
        from scipy import ndimage

        n = ndimage.gaussian_filter(rng.standard_normal((s, s)), sigma=rng.uniform(1.0, 4.0))
        t = (n - n.min()) / (n.max() - n.min() + 1e-9)
    elif kind == "blobs":
        from scipy import ndimage

        t = np.zeros((s, s))
        for _ in range(int(rng.integers(3, 9))):
            rr, cc = disk((rng.uniform(0, s), rng.uniform(0, s)), rng.uniform(3, 10), shape=(s, s))
            t[rr, cc] = 1.0
        t = ndimage.gaussian_filter(t, 1.0)
    elif kind == "gradient":
        t = (u - u.min()) / (u.max() - u.min() + 1e-9)
    elif kind in ("circle", "square", "triangle"):
        t = np.zeros((s, s))
        cy, cx = rng.uniform(0.3, 0.7, size=2) * s
        r = rng.uniform(0.18, 0.35) * s
        if kind == "circle":
            rr, cc = disk((cy, cx), r, shape=(s, s))
        elif kind == "square":
            ang = theta + np.arange(4) * np.pi / 2 + np.pi / 4
            rr, cc = polygon(cy + r * np.sin(ang), cx + r * np.cos(ang), shape=(s, s))
        else:
            ang = theta + np.arange(3) * 2 * np.pi / 3
            rr, cc = polygon(cy + r * np.sin(ang), cx + r * np.cos(ang), shape=(s, s))
        t[rr, cc] = 1.0
    elif kind == "waves":
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (u + rng.uniform(2, 6) * np.sin(v / rng.uniform(4, 10))) / period)
    elif kind == "clouds":  # 1/f^alpha spectral noise
        fy = np.fft.fftfreq(s)[:, None]
        fx = np.fft.fftfreq(s)[None, :]
        f = np.hypot(fy, fx)
        f[0, 0] = 1.0
        spec = np.fft.fft2(rng.standard_normal((s, s))) / f ** rng.uniform(1.6, 2.6)
        n = np.real(np.fft.ifft2(spec))
        t = (n - n.min()) / (n.max() - n.min() + 1e-9)
    else:  # rings
        cy, cx = rng.uniform(0, s, size=2)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * np.hypot(yy - cy, xx - cx) / period)
    img = cb * (1 - t[..., None]) + ca * t[..., None]
    img = img + rng.normal(0, rng.uniform(0.0, 0.04), size=img.shape)
    out = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return out, PROCEDURAL[kind].format(a=a, b=b)


def _dead_leaves(rng: np.random.Generator) -> np.ndarray:
    """A dead-leaves collage: occluding discs, rectangles and triangles of random colours
    and sizes (power law), lightly textured - edges and occlusions like natural images."""
    from scipy import ndimage
    from skimage.draw import disk, polygon

    s = IMAGE_SIZE
    img = np.ones((s, s, 3)) * rng.uniform(0, 1, size=3)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) / s
    for _ in range(int(rng.integers(120, 260))):
        u = rng.random()
        r = 1.0 / np.sqrt(u / 1.5 ** 2 + (1 - u) / 32.0 ** 2)  # p(r) ~ r^-3 on [1.5, 32]
        cy, cx = rng.uniform(-4, s + 4, size=2)
        kind = rng.random()
        if kind < 0.6:
            rr, cc = disk((cy, cx), r, shape=(s, s))
        else:
            n = 4 if kind < 0.85 else 3
            ang = rng.uniform(0, 2 * np.pi) + np.arange(n) * 2 * np.pi / n
            rr, cc = polygon(cy + r * np.sin(ang), cx + r * np.cos(ang), shape=(s, s))
        colour = rng.uniform(0, 1, size=3) * rng.uniform(0.4, 1.0) + rng.uniform(0, 0.3)
        gy, gx = rng.normal(0, 0.3, size=2)  # a gentle shading ramp across the shape
        shade = 1.0 + gy * (yy[rr, cc] - cy / s) + gx * (xx[rr, cc] - cx / s)
        img[rr, cc] = np.clip(colour * shade[:, None], 0, 1)
    if rng.random() < 0.5:
        img = ndimage.gaussian_filter(img, sigma=(rng.uniform(0.3, 0.9),) * 2 + (0,))
    img = img + rng.normal(0, rng.uniform(0.0, 0.03), size=img.shape)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


@dataclass
class Corpus:
    """Clean/defective twins with masks and captions. ``clean[i]`` and ``defective[i]``
    share a base image; ``mask[i]`` is the exact defect mask of ``defective[i]``."""

    clean: np.ndarray  # [N, S, S, 3] uint8
    defective: np.ndarray  # [N, S, S, 3] uint8
    mask: np.ndarray  # [N, S, S] bool
    phrase: list[str]  # object/texture phrase with colour
    defects: list[tuple[str, ...]]  # defect kinds in defective[i]
    caption_clean: list[str] = field(default_factory=list)
    caption_defective: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.phrase)


def _caption(rng: np.random.Generator, phrase: str, defects: Sequence[str]) -> str:
    tpl = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    if not defects:
        state = NORMAL_STATES[int(rng.integers(len(NORMAL_STATES)))]
    else:
        r = rng.random()
        words = DEFECT_WORDS[defects[0]]
        state = ANOMALOUS_STATES[int(rng.integers(len(ANOMALOUS_STATES)))]
        if 0.4 <= r < 0.7:
            state = f"{words[0]} {{}}"
        elif r >= 0.7:
            state = f"{state} {words[1 + int(rng.integers(2))]}"
    return _sentence(tpl, state, phrase)


def build_corpus(seed: int, n: int, *, chunk: int = 0, photo_fraction: float = 0.7,
                 mosaic_p: float = 0.0, recolour_p: float = 0.0, natural_p: float = 0.0,
                 progress: Callable[[Iterable], Iterable] | None = None) -> Corpus:
    """``n`` base images, clean and defective, deterministic from ``(seed, chunk)``."""
    rng = np.random.default_rng([seed, 1, chunk])
    photos = _PhotoSampler()
    clean = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    defective = np.zeros_like(clean)
    mask = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), bool)
    phrases: list[str] = []
    kinds: list[tuple[str, ...]] = []
    cap_c: list[str] = []
    cap_d: list[str] = []
    it: Iterable[int] = range(n)
    if progress is not None:
        it = progress(it)
    for i in it:
        if rng.random() < photo_fraction:
            img, phrase = photos.sample(rng, mosaic_p=mosaic_p, recolour_p=recolour_p)
        else:
            img, phrase = _procedural(rng, natural_p=natural_p)
        clean[i] = img
        out, m = img, np.zeros(img.shape[:2], bool)
        ks: list[str] = []
        for _ in range(1 if rng.random() < 0.8 else 2):
            donor = clean[int(rng.integers(0, i))] if i > 0 and rng.random() < 0.5 else None
            kind, out, mk = synthetic.random_defect(out, rng, donor=donor)
            m |= mk
            ks.append(kind)
        defective[i], mask[i] = out, m
        phrases.append(phrase)
        kinds.append(tuple(ks))
        cap_c.append(_caption(rng, phrase, ()))
        cap_d.append(_caption(rng, phrase, ks))
    return Corpus(clean, defective, mask, phrases, kinds, cap_c, cap_d)


def corpus_digest(corpus: Corpus) -> str:
    """sha256 over every array and string of a corpus (for determinism checks)."""
    h = hashlib.sha256()
    for arr in (corpus.clean, corpus.defective, corpus.mask):
        h.update(np.ascontiguousarray(arr).tobytes())
    for lst in (corpus.phrase, corpus.caption_clean, corpus.caption_defective):
        h.update("\n".join(lst).encode())
    h.update(repr(corpus.defects).encode())
    return h.hexdigest()
