"""Opt-in equivalence test of ``aaclip`` against the authors' released code (``--runslow``).

The released AA-CLIP (github.com/Mwxinnn/AA-CLIP, commit 53db195: ``model/`` — their
open_clip fork with ``adapter.py`` and the surgery ``Attention`` — ``forward_utils.py``,
``dataset/constants.py``; ``train.py`` / ``test.py`` restated) and the suite's ``aaclip``
(``methods/aaclip.py`` on ``bench/backbone.py``) run on the SAME random weights, with the
suite's learnable state copied into the released ``AdaptedCLIP``:
``text_adapters[i]`` -> ``text_adapter[i].fc[0]``, ``text_proj`` -> ``text_adapter[3].fc[0]``,
``image_adapters[i]`` -> ``image_adapter.layer_adapters[i].fc[0]``, ``seg_proj[j]`` ->
``image_adapter.seg_proj[j].fc``, ``det_proj`` -> ``image_adapter.det_proj.fc`` (``relu=False``:
``scripts.sh`` does not pass ``--relu``). Class words: ``class_names = "released"`` on the
suite's side, so both encode the ``REAL_NAMES`` descriptions (MVTec AD ``bottle`` ->
"dark bottle", ``metal_nut`` -> "metal nut which has four notched edges").

Compared:

* the text anchors [T_N, T_A] per class, of CLIP's own tower (``get_adapted_text_embedding(
  clip_model, ...)``, stage 1 not run) and of the adapted one;
* inference (``test.py:76-96``, one class per batch as ``test.py`` asserts, batch of 2, the
  first image scored as industrial, the second as medical): the anomaly map (Σ of the four
  blurred, upsampled level maps) and the image score ``(V_image·T_A + 1) / 2``;
* ONE STAGE-1 STEP (``train.py:57-103``, batch of 2 images of two classes): the stage-1 patch
  features of the four levels (+ global), each level's ``L_seg``, ``L_dis`` (the released
  ``orthogonal_loss``) and the total, and the gradient of every text-side tensor — with both bug
  switches on (``released_stage1_loss``, ``released_vv_batch_axis``) against ``train.py`` as
  released, and with both off against the restated step with the four levels summed and the
  surgery ``Attention`` fed batch-first (``_BatchFirst``: the tokens transposed to (N, L, D)
  around it, so that it attends over the tokens of each image);
* ONE STAGE-2 STEP (``train.py:128-158``, batch of 2 with labels 0 / 1, the anchors of the
  adapted text tower frozen): the CE term, the four ``L_seg``, the total and the gradient of
  every visual-side tensor (6 adapters, 4 + 1 projectors);
* how far the two switches move the stage-1 features, loss and gradients (printed).

Weights. The released ``AdaptedCLIP`` hard-codes ViT-L/14's widths and depths
(``SimpleAdapter(1024, 1024)``, ``SimpleProj(1024, 768)``, ``SimpleAdapter(768, 768)``,
``range(24)``, ``range(12)``), so the model keeps them: vision 24 blocks of width 1024 (16 heads),
patch 14, text 12 blocks of width 768, joint width 768 — with the vision MLP narrowed to
``mlp_ratio`` 1 (the released code never reads the MLP width) to halve time and memory. Drawn at
random at the native 336 px (LayerNorms and biases perturbed, ``random_native_checkpoint``) and
run at ``IMAGE_SIZE`` = 224 px on both sides: the released ``create_model`` path
(``model/clip.py:127-131``: ``CLIP(**cfg)`` from a config without ``quick_gelu``, i.e. **GELU**,
then ``resize_pos_embed``, bicubic + antialias) against ``load_clip(..., activation="gelu",
pos_embed_resize="open_clip")`` — the suite's switch ``[backbones.aaclip] activation = "gelu"``
(the released default size is 518 px; 224 keeps the CPU run short, the code path is the same).

Shims applied to the released code (nothing of it is copied into the project; it is imported
from ``$AACLIP_SRC`` with ``sys.path``/``sys.modules`` restored afterwards, so its top-level
``model``/``dataset``/``forward_utils``/``utils`` do not leak into other tests):

* import-only dependencies missing here get stub modules: ``cv2`` (``forward_utils.py:2``, used
  only by ``visualize``), ``ipdb`` (never called), ``pkg_resources`` (``model/tokenizer.py:6``)
  and, if it is missing, ``kornia`` (``utils.py:6``; ``forward_utils.py:8`` — its
  ``gaussian_blur2d`` is the test-time blur, so the inference comparison is skipped without the
  real ``kornia``, see below); ``sklearn``/``pandas`` likewise if missing (metrics only);
* ``model/clip.py`` ``create_model`` (OpenAI file path) is not called: the test restates its
  lines for a state dict (``CLIP(**cfg)``, ``resize_pos_embed``, ``load_state_dict``); the
  surgery copy (``clip_surgery``) shares the loaded tensors (``assign=True``) to save memory —
  ``DAPM_replace(DPAM_layer=20)`` clones what it replaces, as released;
* ``train.py`` and ``test.py`` are scripts that set ``torch.set_num_threads(4)`` at import, so
  the lines around the model calls are restated in :func:`_released_stage1`,
  :func:`_released_stage2` and :func:`_released_predict`; every model, text, similarity and
  loss function is theirs, and :func:`test_restated_lines_match_release` checks that the
  restated lines occur in the released files verbatim.

Tolerance: anchors, features, maps, scores and loss terms agree to ``ATOL`` = 1e-4 absolute (the
maps are sums of four ``100·cos`` maps, compared relative to their scale); gradients to
``GRAD_RTOL`` = 1e-4 of each tensor's largest gradient.

Observed (2 shared CPU cores, about 4 min; printed with ``-s``): position embedding after the
bicubic resize 0; anchors 4.1e-8 (CLIP's own tower) and 6.0e-8 (adapted); anomaly maps 3.8e-6
(maps of max |map| 2.2), image scores 6.0e-8; stage-1 features <= 1.3e-7, stage-1 loss terms
<= 9.5e-7, gradients <= 2.6e-6 of each tensor's largest (switches on and off alike); stage-2
loss terms <= 4.8e-7, gradients <= 4.6e-6 of each tensor's largest. What the switches move on
these weights: the batch-axis V-V attention — stage-1 features 0.12; both switches together —
stage-1 gradients up to 3.1x the largest. (On random weights T_N and T_A are nearly parallel,
so the stage-2 CE sits at ln 2; its gradient still reaches ``det_proj`` and matches.)

The released code is not a project dependency. To run this test, get a checkout and point
``AACLIP_SRC`` at it::

    git clone https://github.com/Mwxinnn/AA-CLIP /tmp/AA-CLIP
    AACLIP_SRC=/tmp/AA-CLIP pytest --runslow tests/test_released_aaclip.py

From a bare mirror: ``git --git-dir=MIRROR archive HEAD | tar -x -C /tmp/AA-CLIP``. Its imports
need ``ftfy``, ``regex`` (installed with open_clip) and ``torchvision``; the test-time blur needs
the real ``kornia``, kept out of the environment (``kornia_rs`` is its compiled dependency)::

    pip install --no-deps --target /tmp/aaclip_deps kornia kornia_rs
    PYTHONPATH=/tmp/aaclip_deps AACLIP_SRC=/tmp/AA-CLIP pytest --runslow \\
        tests/test_released_aaclip.py

Without it the inference comparison is skipped and the rest runs.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.released_code import (
    assert_restated,
    how_to,
    isolated_import,
    max_abs_diff,
    observer,
    pkg_resources_stub,
    random_native_checkpoint,
    released_checkout,
)

pytestmark = pytest.mark.slow

HOW_TO = how_to("AACLIP_SRC", "Mwxinnn/AA-CLIP", "tests/test_released_aaclip.py")
#: top-level names the released code imports absolutely
RELEASED_MODULES = ("model", "dataset", "forward_utils", "utils")
HAS_KORNIA = importlib.util.find_spec("kornia") is not None


def _stub_modules() -> dict[str, types.ModuleType]:
    """Stand-ins for the released code's import-only dependencies that are missing here."""
    stubs: dict[str, types.ModuleType] = {}
    for name in ("cv2", "ipdb"):                      # visualize() only / never called
        if importlib.util.find_spec(name) is None:
            stubs[name] = types.ModuleType(name)
    if not HAS_KORNIA:                                # utils.py:6, forward_utils.py:8
        def gaussian_blur2d(*args, **kwargs):
            raise RuntimeError("kornia is stubbed: the inference comparison needs the real one")
        stubs["kornia"] = types.ModuleType("kornia")
        stubs["kornia.filters"] = types.ModuleType("kornia.filters")
        stubs["kornia.filters"].gaussian_blur2d = gaussian_blur2d
        stubs["kornia"].filters = stubs["kornia.filters"]
    if importlib.util.find_spec("sklearn") is None:   # forward_utils.py:12, metrics only
        stubs["sklearn"] = types.ModuleType("sklearn")
        stubs["sklearn.metrics"] = types.ModuleType("sklearn.metrics")
        stubs["sklearn.metrics"].roc_auc_score = stubs["sklearn.metrics"].average_precision_score \
            = None
        stubs["sklearn"].metrics = stubs["sklearn.metrics"]
    if importlib.util.find_spec("pandas") is None:    # forward_utils.py:13, never used
        stubs["pandas"] = types.ModuleType("pandas")
    stubs.update(pkg_resources_stub())                # model/tokenizer.py:6
    return stubs


def _import_released(src: Path) -> types.SimpleNamespace:
    """Import the released modules from ``src``; ``sys.path`` and ``sys.modules`` are restored."""
    for rel in ("model/adapter.py", "model/model.py", "model/transformer.py", "forward_utils.py",
                "dataset/constants.py", "train.py", "test.py"):
        if not (src / rel).is_file():
            raise ImportError(f"{src} has no {rel}")
    with isolated_import(src, RELEASED_MODULES, _stub_modules()):
        mm = importlib.import_module("model.model")
        return types.SimpleNamespace(
            CLIP=mm.CLIP,
            resize_pos_embed=mm.resize_pos_embed,
            Attention=importlib.import_module("model.transformer").Attention,
            AdaptedCLIP=importlib.import_module("model.adapter").AdaptedCLIP,
            fu=importlib.import_module("forward_utils"),
            DOMAINS=importlib.import_module("dataset").DOMAINS,
        )


SRC, released = released_checkout("AACLIP_SRC", "AA-CLIP", HOW_TO, _import_released)

ATOL = 1e-4
GRAD_RTOL = 1e-4
ARCH = "zsad-aaclip-released-test"
#: ViT-L-14-336.json (the released model_configs) with the vision MLP narrowed to ratio 1
CONFIG = {"embed_dim": 768,
          "vision_cfg": {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14,
                         "mlp_ratio": 1.0},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12,
                       "layers": 12}}
IMAGE_SIZE = 224
DATASET = "MVTec"
LEVELS = [6, 12, 18, 24]     # train.py:76 encode_image(image, [6, 12, 18, 24]); adapter levels
DPAM_LAYER = 20              # train.py --surgery_until_layer default: blocks 6-24
TEXT_NORM_WEIGHT = 0.1       # train.py --text_norm_weight
ON = {"released_stage1_loss": True, "released_vv_batch_axis": True}
OFF = {"released_stage1_loss": False, "released_vv_batch_axis": False}
#: lines of train.py / test.py restated below (checked verbatim)
RESTATED = [
    ("train.py", "_, patch_features = clip_surgery.encode_image(image, [6, 12, 18, 24])"),
    ("train.py", "cls_token, _ = adapted_model.clipmodel.encode_image(image, [])"),
    ("train.py", "cls_token = cls_token / cls_token.norm(dim=-1, keepdim=True)"),
    ("train.py", "clip_surgery.visual.ln_post(t[:, 1:, :]) for t in patch_features"),
    ("train.py", "patch_features = [t @ clip_surgery.visual.proj for t in patch_features]"),
    ("train.py", "patch_features = [t + cls_token.unsqueeze(1) for t in patch_features]"),
    ("train.py", "patch_preds = calculate_similarity_map(f, epoch_text_feature, img_size)"),
    ("train.py", "loss = calculate_seg_loss(patch_preds, mask)"),
    ("train.py", "(epoch_text_feature[:, :, 0] * epoch_text_feature[:, :, 1])"),
    ("train.py", "loss += orthogonal_loss * text_norm_weight"),
    ("train.py", "clip_surgery.visual.DAPM_replace(DPAM_layer=args.surgery_until_layer)"),
    ("train.py", "patch_features, det_feature = model(image)"),
    ("train.py", "cls_preds = torch.matmul(det_feature, epoch_text_feature)[:, 0]"),
    ("train.py", "loss += F.cross_entropy(cls_preds, label)"),
    ("train.py", "loss += calculate_seg_loss(patch_preds, mask)"),
    ("train.py", "text_embeddings = get_adapted_text_embedding(model, args.dataset, device)"),
    ("test.py", "pred = det_feature @ epoch_text_feature"),
    ("test.py", "pred = (pred[:, 1] + 1) / 2"),
    ("test.py", "f, epoch_text_feature, img_size, test=True, domain=DOMAINS[dataset]"),
    ("test.py", "patch_preds = torch.cat(patch_preds, dim=1).sum(1).cpu().numpy()"),
    ("model/clip.py", "model = CLIP(**model_cfg, cast_dtype=cast_dtype)"),
    ("model/clip.py", "resize_pos_embed(state_dict, model)"),
]
OBSERVED, _observe = observer("aaclip")



# -- the released side -------------------------------------------------------------------------

def _released_clip(checkpoint: Path, share: nn.Module | None = None) -> nn.Module:
    """model/clip.py:119-131 for a state dict: ``CLIP(**cfg)`` (no ``quick_gelu``: GELU),
    ``resize_pos_embed``, strict load. ``share``: reuse its tensors (the surgery copy)."""
    cfg = {**CONFIG, "vision_cfg": {**CONFIG["vision_cfg"], "image_size": IMAGE_SIZE}}
    model = released.CLIP(**cfg, cast_dtype=None)
    if share is not None:
        model.load_state_dict(share.state_dict(), strict=True, assign=True)
    else:
        state = torch.load(checkpoint, map_location="cpu")
        released.resize_pos_embed(state, model)
        model.load_state_dict(state, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class _BatchFirst(nn.Module):
    """The released surgery ``Attention`` on batch-first tokens: what ``B, N, C = q_x.shape``
    (``model/transformer.py:125``) means to read; the tokens arrive sequence-first (LND)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        x, attn = self.inner(q_x.transpose(0, 1), k_x, v_x, attn_mask=attn_mask)
        return [x.transpose(0, 1), attn]


@contextlib.contextmanager
def _batch_first_surgery(surgery: nn.Module, enabled: bool):
    blocks = [b for b in surgery.visual.transformer.resblocks
              if isinstance(b.attn, released.Attention)]
    assert len(blocks) == DPAM_LAYER - 1
    if enabled:
        for b in blocks:
            b.attn = _BatchFirst(b.attn)
    try:
        yield
    finally:
        if enabled:
            for b in blocks:
                b.attn = b.attn.inner


def _released_text(model, class_names, *, grad: bool) -> torch.Tensor:
    """train.py:63-72: per-sample anchors [B, D, 2] from
    ``get_adapted_single_class_text_embedding`` (each class encoded once)."""
    fu = released.fu
    with torch.set_grad_enabled(grad):
        feats = {c: fu.get_adapted_single_class_text_embedding(model, DATASET, c, "cpu")
                 for c in list(set(class_names))}
        return torch.stack([feats[c] for c in class_names], dim=0)


def _released_stage1(adapted, surgery, batch, *, intended: bool) -> dict:
    """train.py:57-103, one step (loss and gradients; no optimizer step). ``intended``: the
    four levels summed and the surgery attention over tokens, else as released."""
    fu = released.fu
    image, mask = batch["image"], batch["mask"]
    epoch_text_feature = _released_text(adapted, batch["category"], grad=True)
    with torch.no_grad(), _batch_first_surgery(surgery, intended):
        _, patch_features = surgery.encode_image(image, [6, 12, 18, 24])
        cls_token, _ = adapted.clipmodel.encode_image(image, [])
        cls_token = cls_token / cls_token.norm(dim=-1, keepdim=True)
        patch_features = [surgery.visual.ln_post(t[:, 1:, :]) for t in patch_features]
        patch_features = [t @ surgery.visual.proj for t in patch_features]
        patch_features = [t / t.norm(dim=-1, keepdim=True) for t in patch_features]
        patch_features = [t + cls_token.unsqueeze(1) for t in patch_features]
    segs = []
    for f in patch_features:
        patch_preds = fu.calculate_similarity_map(f, epoch_text_feature, IMAGE_SIZE)
        loss = fu.calculate_seg_loss(patch_preds, mask)
        segs.append(loss.detach().clone())
        orthogonal_loss = (
            (epoch_text_feature[:, :, 0] * epoch_text_feature[:, :, 1]).sum(1).mean()
        ) ** 2
        loss += orthogonal_loss * TEXT_NORM_WEIGHT
        if intended:
            segs[-1] = fu.calculate_seg_loss(patch_preds, mask)   # kept in the graph
    if intended:
        seg = torch.stack(segs).sum()
        loss = seg + orthogonal_loss * TEXT_NORM_WEIGHT
    else:
        seg = segs[-1]
    adapted.text_adapter.zero_grad()
    loss.backward()
    return {"features": patch_features, "levels": [s.detach() for s in segs],
            "seg": seg.detach(), "dis": orthogonal_loss.detach(), "total": loss.detach(),
            "text": epoch_text_feature.detach()}


def _released_stage2(adapted, batch) -> dict:
    """train.py:338-344 (frozen anchors of the adapted text tower) and 128-158, one step."""
    fu = released.fu
    image, mask, label = batch["image"], batch["mask"], batch["label"]
    epoch_text_feature = _released_text(adapted, batch["category"], grad=False)
    patch_features, det_feature = adapted(image)
    loss = 0.0
    det_feature = det_feature.unsqueeze(1)
    cls_preds = torch.matmul(det_feature, epoch_text_feature)[:, 0]
    cls = F.cross_entropy(cls_preds, label)
    loss += cls
    segs = []
    for f in patch_features:
        patch_preds = fu.calculate_similarity_map(f, epoch_text_feature, IMAGE_SIZE)
        seg = fu.calculate_seg_loss(patch_preds, mask)
        segs.append(seg.detach())
        loss += seg
    adapted.image_adapter.zero_grad()
    loss.backward()
    return {"cls": cls.detach(), "levels": segs, "seg": torch.stack(segs).sum(),
            "total": loss.detach()}


def _released_predict(adapted, images, class_name: str, domains) -> dict:
    """test.py:76-96 with the adapted text (test.py:192-196): map and score per image, the
    ``i``-th image scored with ``DOMAINS``-style domain ``domains[i]``."""
    fu = released.fu
    with torch.no_grad():
        epoch_text_feature = fu.get_adapted_single_class_text_embedding(
            adapted, DATASET, class_name, "cpu")
        patch_features, det_feature = adapted(images)
        pred = det_feature @ epoch_text_feature
        pred = (pred[:, 1] + 1) / 2
        maps = {}
        for domain in set(domains):
            patch_preds = []
            for f in patch_features:
                patch_pred = fu.calculate_similarity_map(
                    f, epoch_text_feature, IMAGE_SIZE, test=True, domain=domain)
                patch_preds.append(patch_pred)
            maps[domain] = torch.cat(patch_preds, dim=1).sum(1)
        anomaly_map = torch.stack([maps[d][i] for i, d in enumerate(domains)])
    return {"map": anomaly_map, "score": pred, "text": epoch_text_feature}


# -- learnable state ---------------------------------------------------------------------------

def _learnable(ours, adapted) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(name, suite tensor, released tensor) for every learnable tensor."""
    head, ta, ia = ours.head, adapted.text_adapter, adapted.image_adapter
    rows = [(f"text_adapters[{i}]", lin.weight, ta[i].fc[0].weight)
            for i, lin in enumerate(head.text_adapters)]
    rows.append(("text_proj", head.text_proj.weight, ta[-1].fc[0].weight))
    rows += [(f"image_adapters[{i}]", lin.weight, ia["layer_adapters"][i].fc[0].weight)
             for i, lin in enumerate(head.image_adapters)]
    rows += [(f"seg_proj[{j}]", lin.weight, ia["seg_proj"][j].fc.weight)
             for j, lin in enumerate(head.seg_proj)]
    rows.append(("det_proj", head.det_proj.weight, ia["det_proj"].fc.weight))
    assert {id(r[1]) for r in rows} == {id(p) for p in head.parameters()}
    assert {id(r[2]) for r in rows} == {id(p) for p in ta.parameters()} | \
        {id(p) for p in ia.parameters()}
    return rows


def _new_pair(backbone, clip_model, seed: int, **hp):
    """A fresh suite method and released ``AdaptedCLIP`` holding the same learnable state."""
    from methods.aaclip import AACLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ours = AACLIP(backbone, class_names="released", augment=False, **hp)
        adapted = released.AdaptedCLIP(clip_model, text_adapt_weight=0.1,
                                       image_adapt_weight=0.1, text_adapt_until=3,
                                       image_adapt_until=6, relu=False)
    adapted.eval()
    with torch.no_grad():
        for _, mine, theirs in _learnable(ours, adapted):
            theirs.copy_(mine)
    ours.head.text_trained.fill_(1.0)        # anchors from the adapted tower (a text checkpoint)
    return ours, adapted


def _batch(seed: int, categories: list[str]) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = len(categories)
    images = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    mask = torch.zeros(n, IMAGE_SIZE, IMAGE_SIZE)
    mask[-1, 40:120, 60:170] = 1
    if n > 2:
        mask[1, 150:200, 10:90] = 1
    images[mask[:, None].expand_as(images) > 0] += 1.0
    label = (mask.flatten(1).amax(1) > 0).long()
    return {"image": images, "mask": mask, "label": label, "category": categories,
            "dataset": ["mvtec"] * n, "prompt_name": [c.replace("_", " ") for c in categories]}


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights at the native 336 px, as an OpenAI/open_clip-format state dict file."""
    return random_native_checkpoint(tmp_path_factory.mktemp("released_aaclip"), ARCH, CONFIG)


@pytest.fixture(scope="module")
def backbone(checkpoint):
    from bench.backbone import load_clip

    return load_clip(ARCH, str(checkpoint), image_size=IMAGE_SIZE, activation="gelu",
                     pos_embed_resize="open_clip")


@pytest.fixture(scope="module")
def clip_model(checkpoint):
    return _released_clip(checkpoint)


@pytest.fixture(scope="module")
def clip_surgery(checkpoint, clip_model):
    surgery = _released_clip(checkpoint, share=clip_model)
    surgery.visual.DAPM_replace(DPAM_layer=DPAM_LAYER)
    for p in surgery.parameters():
        p.requires_grad_(False)
    return surgery


# -- tests -------------------------------------------------------------------------------------

def test_restated_lines_match_release():
    assert_restated(Path(SRC).expanduser(), RESTATED)


def test_same_setup(backbone, clip_model):
    """Architecture, activation, position grid, prompts and hyper-parameters agree."""
    from methods.aaclip import AACLIP, ANOMALOUS_STATES, NORMAL_STATES, RELEASED_NAMES, TEMPLATES

    assert backbone.activation == "gelu" and backbone.num_layers == 24
    assert backbone.text_layers == 12 and backbone.grid_size == IMAGE_SIZE // 14
    assert isinstance(clip_model.visual.transformer.resblocks[0].mlp.gelu, nn.GELU)
    assert _observe("position embedding (bicubic + antialias 24 -> 16)",
                    max_abs_diff(clip_model.visual.positional_embedding,
                             backbone.model.visual.positional_embedding)) < 1e-6
    prompts = released.fu.PROMPTS
    assert tuple(prompts["prompt_normal"]) == NORMAL_STATES
    assert tuple(prompts["prompt_abnormal"]) == ANOMALOUS_STATES
    assert tuple(prompts["prompt_templates"]) == TEMPLATES
    for c, name in released.fu.REAL_NAMES[DATASET].items():
        assert RELEASED_NAMES[("mvtec", c)] == name, c
    hp = AACLIP.default_hparams
    assert (hp["text_layers"], hp["image_layers"], hp["feature_layers"]) == (3, 6, LEVELS)
    assert hp["surgery_start"] == 24 - (DPAM_LAYER - 1) + 1
    assert (hp["text_lr"], hp["lr"], tuple(hp["betas"])) == (1e-5, 5e-4, (0.5, 0.999))
    assert hp["dis_weight"] == TEXT_NORM_WEIGHT and hp["proj_relu"] is False
    ours, adapted = _new_pair(backbone, clip_model, seed=0)
    n_ours = sum(p.numel() for p in ours.head.parameters())
    n_theirs = sum(p.numel() for p in adapted.text_adapter.parameters()) + \
        sum(p.numel() for p in adapted.image_adapter.parameters())
    assert n_ours == n_theirs == 12_582_912          # docs/methods.md (ViT-L/14@336)


def test_text_anchors_match(backbone, clip_model):
    """Anchors of CLIP's own tower (stage 1 not run) and of the adapted tower."""
    ours, adapted = _new_pair(backbone, clip_model, seed=0)
    names = ["bottle", "metal_nut"]
    batch = _batch(0, names)
    with torch.no_grad():
        words = ours.class_words(batch)
        assert words == ["dark bottle", "metal nut which has four notched edges"]
        mine_clip = ours.anchors(words, adapted=False)          # [B, 2, D]
        mine_adapted = ours.anchors(words, adapted=True)
        theirs_clip = _released_text(clip_model, names, grad=False)   # [B, D, 2]
        theirs_adapted = _released_text(adapted, names, grad=False)
    assert _observe("anchors, CLIP's own text tower",
                    max_abs_diff(mine_clip, theirs_clip.transpose(1, 2))) < ATOL
    assert _observe("anchors, adapted text tower",
                    max_abs_diff(mine_adapted, theirs_adapted.transpose(1, 2))) < ATOL
    assert max_abs_diff(mine_clip, mine_adapted) > 100 * ATOL      # the adapters change the text


def test_inference_matches(backbone, clip_model):
    """test.py vs ``predict``: anomaly maps and image scores (industrial and medical)."""
    if not HAS_KORNIA:
        pytest.skip("the test-time blur is kornia's gaussian_blur2d: install kornia with "
                    "`pip install --no-deps --target /tmp/aaclip_deps kornia kornia_rs` and "
                    "set PYTHONPATH=/tmp/aaclip_deps (see the docstring)")
    ours, adapted = _new_pair(backbone, clip_model, seed=0)
    batch = _batch(1, ["bottle", "bottle"])
    batch["domain"] = ["industrial", "medical"]
    theirs = _released_predict(adapted, batch["image"], "bottle", ["Industrial", "Medical"])
    pred = ours.predict(batch)
    scale = float(theirs["map"].abs().max())
    assert _observe("anomaly map |diff| (industrial, medical)",
                    max_abs_diff(pred.anomaly_maps, theirs["map"])) < ATOL * max(1.0, scale)
    _observe("anomaly map scale (max |map|)", scale)
    assert _observe("image score |diff|", max_abs_diff(pred.image_scores, theirs["score"])) < ATOL
    assert float(theirs["map"].std()) > 1e-3


def _compare_grads(label: str, rows, names) -> dict[str, torch.Tensor]:
    grads, worst = {}, 0.0
    for name, a, b in rows:
        if name.split("[")[0] not in names:
            continue
        assert a.grad is not None and b.grad is not None, name
        scale = float(b.grad.abs().max())
        assert scale > 0, name
        rel = max_abs_diff(a.grad, b.grad) / scale
        print(f"[released aaclip] {label} grad {name}: |diff| / max |grad| = {rel:.2e}")
        worst = max(worst, rel)
        assert rel < GRAD_RTOL, (name, rel)
        grads[name] = a.grad.detach().clone()
    _observe(f"{label} max grad |diff| / max |grad|", worst)
    return grads


def _stage1(backbone, clip_model, clip_surgery, batch, hp: dict, *, intended: bool, label: str):
    ours, adapted = _new_pair(backbone, clip_model, seed=1, **hp)
    ours.head.text_trained.fill_(0.0)
    ours._set_stage("text")
    total, parts = ours.stage1_loss(batch)
    total.backward()
    with torch.no_grad():
        feats = ours.stage1_features(batch["image"])
    theirs = _released_stage1(adapted, clip_surgery, batch, intended=intended)
    for j, (f, g) in enumerate(zip(feats, theirs["features"], strict=True)):
        assert _observe(f"{label} stage-1 features, level {LEVELS[j]}", max_abs_diff(f, g)) < ATOL
    for key, mine in (("seg", parts["seg"]), ("dis", parts["dis"]), ("total", total)):
        assert _observe(f"{label} loss {key} ({float(theirs[key]):.4f}) |diff|",
                        max_abs_diff(mine, theirs[key])) < ATOL, key
    rows = _learnable(ours, adapted)
    grads = _compare_grads(label, rows, {"text_adapters", "text_proj"})
    assert all(a.grad is None for n, a, _ in rows if n.split("[")[0] not in
               {"text_adapters", "text_proj"})
    return types.SimpleNamespace(grads=grads, feats=feats, theirs=theirs)


@pytest.fixture(scope="module")
def stage1_batch() -> dict:
    return _batch(2, ["bottle", "metal_nut"])


@pytest.fixture(scope="module")
def stage1_on(backbone, clip_model, clip_surgery, stage1_batch):
    return _stage1(backbone, clip_model, clip_surgery, stage1_batch, ON, intended=False,
                   label="stage 1 (switches on vs released)")


def test_stage1_switches_on(stage1_on):
    """Both switches on vs train.py as released (compared in the fixture)."""
    assert len(stage1_on.grads) == 4


def test_stage1_switches_off(backbone, clip_model, clip_surgery, stage1_batch, stage1_on):
    """Both switches off (default) vs train.py with the levels summed and the surgery attention
    over tokens; and how far the switches move features, loss and gradients."""
    off = _stage1(backbone, clip_model, clip_surgery, stage1_batch, OFF, intended=True,
                  label="stage 1 (switches off vs released, intended)")
    on = stage1_on
    moved = max(max_abs_diff(a, b) for a, b in zip(off.feats, on.feats, strict=True))
    _observe("stage-1 features, batch axis vs tokens (max over levels)", moved)
    assert moved > 100 * ATOL
    _observe("stage-1 loss, switches off vs on",
             abs(float(off.theirs["total"]) - float(on.theirs["total"])))
    rel = max(max_abs_diff(off.grads[k], on.grads[k]) / float(on.grads[k].abs().max())
              for k in on.grads)
    _observe("stage-1 max |grad off - grad on| / max |grad on| (per tensor)", rel)
    assert rel > 100 * GRAD_RTOL


def test_stage2_step(backbone, clip_model):
    """One stage-2 step: CE, Σ L_seg, total and the gradients of the visual-side tensors."""
    ours, adapted = _new_pair(backbone, clip_model, seed=2)
    batch = _batch(3, ["bottle", "metal_nut"])
    ours._set_stage("image")
    total, parts = ours.stage2_loss(batch)
    total.backward()
    theirs = _released_stage2(adapted, batch)
    for key, mine in (("cls", parts["cls"]), ("seg", parts["seg"]), ("total", total)):
        assert _observe(f"stage 2 loss {key} ({float(theirs[key]):.4f}) |diff|",
                        max_abs_diff(mine, theirs[key])) < ATOL, key
    rows = _learnable(ours, adapted)
    grads = _compare_grads("stage 2", rows, {"image_adapters", "seg_proj", "det_proj"})
    assert len(grads) == 11
    assert all(a.grad is None for n, a, _ in rows if n.split("[")[0] in
               {"text_adapters", "text_proj"})
