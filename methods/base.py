"""The method plugin API: :class:`Method`, :class:`Prediction`, :func:`register`, :func:`check_method`.

A method is one class, registered by name::

    from methods.base import Method, Prediction, register

    @register("my_method")
    class MyMethod(Method):
        '''One line that `zsad-bench list methods` shows.'''
        trains = True
        default_hparams = {"epochs": 15, "lr": 1e-3}

        def __init__(self, backbone, **hparams):
            super().__init__(backbone, **hparams)
            self.head = torch.nn.Linear(backbone.embed_dim, 2)   # the learnable parts

        def fit(self, aux_loader, *, epochs, seed, progress=iter): ...
        def predict(self, batch) -> Prediction: ...

``batch`` is a dict: ``image`` [B, 3, S, S] (CLIP-normalised float), ``mask`` [B, S, S]
(0/1 float; zeros where the dataset has no mask), ``label`` [B], and lists of strings
``category``, ``prompt_name`` (the category's object words), ``dataset``, ``domain``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from bench.registry import METHODS

Progress = Callable[[Iterable], Iterable]


def register(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name``."""
    return METHODS.decorator(name)


@dataclass
class Prediction:
    """Per-image anomaly scores [B] and anomaly maps [B, S, S] (higher = more anomalous)."""

    image_scores: torch.Tensor
    anomaly_maps: torch.Tensor

    def detach(self) -> Prediction:
        return Prediction(self.image_scores.detach().float().cpu(),
                          self.anomaly_maps.detach().float().cpu())


class Method:
    """Base class of every ZSAD method.

    Class attributes describe the method to the runner:

    * ``trains`` — trained on the auxiliary dataset (False: training-free);
    * ``seeded`` — its output depends on the seed (trained methods, test-time adaptation);
      unseeded methods run once, seeded ones with every protocol seed;
    * ``requires`` — name of a method whose trained state (same aux and seed) this one
      starts from; the runner passes it to :meth:`init_from` before :meth:`fit`;
    * ``few_shot`` — needs k normal reference images of each target category: the runner
      calls :meth:`set_support` before predicting that category (k from the protocol's
      ``[few_shot]`` table; records carry ``shots = k``);
    * ``default_hparams`` — the paper's settings; the protocol may override any of them.
    * ``finalize_category(scores, maps, *, domain)`` (optional method) — a scoring rule that
      needs a whole category's test images at once (AA-CLIP's per-category min-max fusion):
      the runner calls it with the category's image scores [N] and maps [N, S, S] (NumPy)
      after predicting them and computes the metrics on what it returns.
    * ``released_inputs`` — what the authors' released code feeds the method where it differs
      from the suite's defaults: ``pos_embed_resize`` (``"open_clip"`` | ``"bilinear"``),
      ``class_words`` (``"readable"`` | ``"folder"``), ``activation``. A protocol that sets
      one of them overrides it (``bench.protocol``; ``full_uniform.toml`` sets all). Clear bugs
      of the released code are *not* put here: they are listed in ``docs/methods.md`` with
      the protocol switch that reproduces them.
    """

    name: ClassVar[str] = ""
    trains: ClassVar[bool] = False
    seeded: ClassVar[bool | None] = None
    requires: ClassVar[str | None] = None
    few_shot: ClassVar[bool] = False
    paper: ClassVar[str] = ""
    bibtex: ClassVar[str] = ""
    default_hparams: ClassVar[dict[str, Any]] = {}
    #: hyperparameters counted in epochs: ``[run] epochs_scale`` multiplies each of them
    epoch_hparams: ClassVar[tuple[str, ...]] = ("epochs",)
    released_inputs: ClassVar[dict[str, str]] = {}

    def __init__(self, backbone: Any, **hparams: Any) -> None:
        unknown = sorted(set(hparams) - set(self.default_hparams) - {"epochs"})
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown hyperparameters {unknown}; "
                            f"known: {sorted(self.default_hparams)}")
        self.backbone = backbone
        self.hparams: dict[str, Any] = {**copy.deepcopy(self.default_hparams), **hparams}
        self.head: nn.Module | None = None

    # -- description -----------------------------------------------------------------
    @classmethod
    def is_seeded(cls) -> bool:
        return cls.trains if cls.seeded is None else cls.seeded

    @classmethod
    def description(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    # -- the protocol --------------------------------------------------------------
    def fit(self, aux_loader: Iterable[dict], *, epochs: int | None = None, seed: int = 0,
            progress: Progress = iter) -> None:
        """Train the learnable parts on the auxiliary data (no-op for training-free methods)."""
        if self.trains:
            raise NotImplementedError(f"{type(self).__name__} trains but does not implement fit")

    def predict(self, batch: dict[str, Any]) -> Prediction:
        raise NotImplementedError

    def set_support(self, batch: dict[str, Any]) -> None:
        """Few-shot methods: the k normal reference images of the category about to be predicted."""
        raise NotImplementedError(f"{type(self).__name__} declares few_shot but does not "
                                  "implement set_support")

    def init_from(self, state: dict[str, torch.Tensor]) -> None:
        """Start from the trained state of ``self.requires`` (same aux, same seed)."""
        raise NotImplementedError(f"{type(self).__name__} declares requires={self.requires!r} "
                                  "but does not implement init_from")

    # -- learnable state -------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.head is None else {k: v.detach().clone() for k, v in
                                             self.head.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.head is None:
            if state:
                raise ValueError(f"{type(self).__name__} has no learnable state but got "
                                 f"{len(state)} tensors")
            return
        self.head.load_state_dict(state)

    def learnable_parameters(self) -> int:
        if self.head is None:
            return 0
        return sum(p.numel() for p in self.head.parameters() if p.requires_grad)

    def to(self, device: torch.device | str) -> Method:
        if self.head is not None:
            self.head.to(device)
        return self


# ----------------------------------------------------------------------------------
# Conformance check, in the spirit of scikit-learn's check_estimator
# ----------------------------------------------------------------------------------

def _toy_batches(image_size: int, n_batches: int = 2, batch_size: int = 4,
                 seed: int = 0) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(n_batches):
        img = torch.randn(batch_size, 3, image_size, image_size, generator=g)
        mask = torch.zeros(batch_size, image_size, image_size)
        label = torch.tensor([i % 2 for i in range(batch_size)])
        for i in range(batch_size):
            if label[i]:
                s = image_size // 4
                y, x = (torch.randint(0, image_size - s, (2,), generator=g)).tolist()
                mask[i, y:y + s, x:x + s] = 1
                img[i, :, y:y + s, x:x + s] += 2.0
        cats = ["toy_a" if (b + i) % 2 else "toy_b" for i in range(batch_size)]
        batches.append({
            "image": img, "mask": mask, "label": label, "category": cats,
            "prompt_name": [c.replace("_", " ") for c in cats],
            "dataset": ["toy"] * batch_size, "domain": ["industrial"] * batch_size,
        })
    return batches


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_method(cls: type[Method], backbone: Any = None, **hparams: Any) -> None:
    """Raise AssertionError unless ``cls`` honours the plugin contract.

    Checks: output types, shapes and dtypes; finite values; determinism under a seed;
    predict does not change state; the learnable state round-trips through
    ``state_dict``/``load_state_dict``; fit is a no-op for training-free methods.
    ``hparams`` shrink the run (e.g. ``epochs=1``) — defaults: one epoch.
    """
    if backbone is None:
        from bench.backbone import load_clip

        backbone = load_clip("zsad-tiny", None, image_size=64, seed=0)
    assert issubclass(cls, Method), f"{cls} must subclass methods.base.Method"
    assert cls.name, f"{cls.__name__} has no registry name (decorate it with @register)"
    S = backbone.image_size
    batches = _toy_batches(S)
    epochs = hparams.pop("epochs", 1)
    # few-shot methods: k = 2 normal reference images (toy batch with labels and masks cleared)
    support = _toy_batches(S, n_batches=1, batch_size=2, seed=99)[0]
    support["label"] = torch.zeros_like(support["label"])
    support["mask"] = torch.zeros_like(support["mask"])

    def build_and_fit(seed: int) -> Method:
        _seed_all(seed)
        m = cls(backbone, **hparams)
        if cls.requires:
            from bench.registry import create_method

            dep = create_method(cls.requires, backbone, epochs=epochs)
            dep.fit(batches, epochs=epochs, seed=seed)
            m.init_from(dep.state_dict())
        m.fit(batches, epochs=epochs, seed=seed)
        return m

    def run(m: Method, seed: int = 123) -> list[Prediction]:
        _seed_all(seed)
        if cls.few_shot:
            m.set_support(support)
        with torch.no_grad() if not cls.is_seeded() else torch.enable_grad():
            return [m.predict(b).detach() for b in batches]

    m1 = build_and_fit(0)
    p1 = run(m1)
    for batch, p in zip(batches, p1, strict=True):
        B = batch["image"].shape[0]
        assert isinstance(p, Prediction), f"{cls.name}.predict must return a Prediction"
        assert tuple(p.image_scores.shape) == (B,), \
            f"{cls.name}: image_scores shape {tuple(p.image_scores.shape)} != ({B},)"
        assert tuple(p.anomaly_maps.shape) == (B, S, S), \
            f"{cls.name}: anomaly_maps shape {tuple(p.anomaly_maps.shape)} != ({B}, {S}, {S})"
        assert p.image_scores.is_floating_point() and p.anomaly_maps.is_floating_point(), \
            f"{cls.name}: outputs must be floating point"
        assert torch.isfinite(p.image_scores).all() and torch.isfinite(p.anomaly_maps).all(), \
            f"{cls.name}: outputs contain NaN or inf"
    # predict is repeatable and does not change the learnable state
    state_before = m1.state_dict()
    p1b = run(m1)
    for a, b in zip(p1, p1b, strict=True):
        assert torch.equal(a.image_scores, b.image_scores) and torch.equal(a.anomaly_maps, b.anomaly_maps), \
            f"{cls.name}: predict is not repeatable under the same seed"
    for k, v in m1.state_dict().items():
        assert torch.equal(v, state_before[k]), f"{cls.name}: predict changed learnable tensor {k}"
    # determinism of training under a seed
    m2 = build_and_fit(0)
    for a, b in zip(p1, run(m2), strict=True):
        assert torch.equal(a.image_scores, b.image_scores) and torch.equal(a.anomaly_maps, b.anomaly_maps), \
            f"{cls.name}: two runs with seed 0 differ"
    # state round trip
    m3 = cls(backbone, **hparams)
    m3.load_state_dict(m1.state_dict())
    for a, b in zip(p1, run(m3), strict=True):
        assert torch.allclose(a.image_scores, b.image_scores) and torch.allclose(a.anomaly_maps, b.anomaly_maps), \
            f"{cls.name}: predictions differ after state_dict/load_state_dict"
