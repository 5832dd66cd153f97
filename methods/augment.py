"""Training-time augmentation of the trained methods — one seeded module.

Every random choice an augmentation makes comes from its own :class:`torch.Generator`,
seeded from the job's seed, so a training run is reproducible bit for bit and does not
disturb (or depend on) the global RNG streams the runner seeds.

* :class:`Mosaic` — the 4-image mosaic of VAND / APRIL-GAN (Chen et al. 2023). The report
  does not describe it; it is in the released training code (``MVTecDataset.combine_img``,
  ``--aug_rate 0.2``, used on MVTec AD only, never on VisA). With probability ``rate`` a
  training image is replaced by a 2×2 grid of four images of its category, masks composed
  the same way.

The authors draw the four images from the whole category folder on disk. A method here
sees batches, not the dataset, so :class:`Mosaic` keeps a small per-category pool of the
images it has already seen (reservoir sampling, capacity ``pool_size``; the current batch
is added first) and draws the four tiles from that pool, with replacement, as the
authors' ``random.choice`` does. Tiles are stored already at quadrant size (half the
side), in the input dtype, so the pool costs ``pool_size / 4`` images per category.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def _half(x: torch.Tensor, size: tuple[int, int], *, mask: bool) -> torch.Tensor:
    """Resize [C, H, W] to ``size``: antialiased bicubic for images; masks re-binarised at 0.5."""
    if mask:
        y = F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False,
                          antialias=True)[0]
        return (y > 0.5).to(x.dtype)
    return F.interpolate(x[None].float(), size=size, mode="bicubic", align_corners=False,
                         antialias=True)[0].to(x.dtype)


class Mosaic:
    """VAND's 4-image mosaic augmentation, seeded (see the module docstring).

    ``rate``: probability that an image is replaced by a mosaic (0 disables it).
    ``pool_size``: images remembered per category. ``exclude``: datasets (batch key
    ``dataset``) never augmented — the authors use the mosaic on MVTec AD only, not when
    training on VisA, hence the default ``("visa",)``.
    """

    def __init__(self, rate: float, *, seed: int = 0, pool_size: int = 8,
                 exclude: Sequence[str] = ("visa",)) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"mosaic rate must be in [0, 1], got {rate}")
        if pool_size < 1:
            raise ValueError(f"mosaic pool_size must be >= 1, got {pool_size}")
        self.rate = float(rate)
        self.pool_size = int(pool_size)
        self.exclude = {str(d) for d in exclude}
        self.generator = torch.Generator().manual_seed(int(seed))
        #: category -> list of (tile image [3, h, w], tile mask [h, w], label)
        self.pool: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}
        self._seen: dict[str, int] = {}

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def _randint(self, n: int) -> int:
        return int(torch.randint(n, (), generator=self.generator))

    def remember(self, category: str, image: torch.Tensor, mask: torch.Tensor, label: int) -> None:
        """Add one image to its category's pool (reservoir sampling beyond ``pool_size``)."""
        S = image.shape[-1]
        tile = (S + 1) // 2
        entry = (_half(image, (tile, tile), mask=False), _half(mask[None], (tile, tile), mask=True)[0],
                 int(label))
        pool = self.pool.setdefault(category, [])
        seen = self._seen.get(category, 0) + 1
        self._seen[category] = seen
        if len(pool) < self.pool_size:
            pool.append(entry)
        else:
            j = self._randint(seen)
            if j < self.pool_size:
                pool[j] = entry

    def compose(self, category: str, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A 2×2 mosaic of four pool images of ``category`` (drawn with replacement).

        Returns (image [3, H, W], mask [H, W], label): tile ``i`` goes to row ``i // 2``,
        column ``i % 2``; the label is 1 if any tile is anomalous.
        """
        pool = self.pool[category]
        H, W = size
        rows, cols = (H // 2, H - H // 2), (W // 2, W - W // 2)
        img0, mask0, _ = pool[0]
        image = torch.empty(img0.shape[0], H, W, dtype=img0.dtype)
        mask = torch.empty(H, W, dtype=mask0.dtype)
        label = 0
        for i in range(4):
            t_img, t_mask, t_label = pool[self._randint(len(pool))]
            r, c = i // 2, i % 2
            h, w = rows[r], cols[c]
            if t_img.shape[-2:] != (h, w):
                t_img = _half(t_img, (h, w), mask=False)
                t_mask = _half(t_mask[None], (h, w), mask=True)[0]
            y0, x0 = r * rows[0], c * cols[0]
            image[:, y0:y0 + h, x0:x0 + w] = t_img
            mask[y0:y0 + h, x0:x0 + w] = t_mask
            label = max(label, t_label)
        return image, mask, label

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Return ``batch`` with some images replaced by mosaics (a new dict; input untouched)."""
        if self.rate <= 0:
            return batch
        images, masks, labels = batch["image"], batch["mask"], batch["label"]
        cats = list(batch["category"])
        datasets = list(batch.get("dataset", [""] * len(cats)))
        keep = [d not in self.exclude for d in datasets]
        # the current batch joins the pool first, so a category is never empty
        for i, c in enumerate(cats):
            if keep[i]:
                self.remember(c, images[i].detach().cpu(), masks[i].detach().cpu(), int(labels[i]))
        out_img, out_mask, out_label = images.clone(), masks.clone(), labels.clone()
        changed = False
        for i, c in enumerate(cats):
            if not keep[i] or self._rand() >= self.rate:
                continue
            img, mask, label = self.compose(c, tuple(images.shape[-2:]))
            out_img[i] = img.to(images)
            out_mask[i] = mask.to(masks)
            out_label[i] = label
            changed = True
        if not changed:
            return batch
        return {**batch, "image": out_img, "mask": out_mask, "label": out_label}
