"""Opt-in equivalence test of ``anomalyclip`` against the authors' released code (``--runslow``).

The released AnomalyCLIP (github.com/zqhang/AnomalyCLIP: ``AnomalyCLIP_lib``,
``prompt_ensemble.py``, ``loss.py``) and the suite's ``anomalyclip`` (``methods/anomalyclip.py``
on ``bench/backbone.py`` and ``methods/prompt_learning.py``) run on the SAME random weights,
with the suite's learnable state copied into the released ``AnomalyCLIP_PromptLearner``
(``ctx_normal`` -> ``ctx_pos[0, 0]``, ``ctx_anomalous`` -> ``ctx_neg[0, 0]``, ``deep.tokens[j]``
-> ``compound_prompts_text[j]``). Compared: text features; the DPAM patch tokens, similarity
maps, anomaly maps (before and after the σ = 4 Gaussian) and image scores of ``test.py``;
one training step of ``train.py``: the four loss terms (global CE, focal, the two Dice), the
gradient of every learnable tensor and the learnable state after one Adam step (lr 1e-3,
betas (0.5, 0.999)).

Weights. A ViT-L-14-336-shaped CLIP with the real depths (24 visual blocks, 12 text blocks,
patch 14, native 336 px, so DPAM from block 6, features of block 24 and deep prompts in text
blocks 2-9 hold unchanged) but narrow widths (vision 128 = 2 heads of 64, text 128 = 2 heads,
embed 64: the released ``build_model`` infers heads as ``width // 64``), drawn at random at
its native 336 px (LayerNorm parameters and biases perturbed too) and saved as an
OpenAI/open_clip-format state dict. The suite loads the file with
``load_clip(arch, file, image_size=518, activation="quick_gelu", pos_embed_resize="bilinear")``
(the ``full`` protocol's settings for anomalyclip: the released code builds QuickGELU and
resizes the position grid 24 -> 37 bilinearly in ``VisionTransformer.forward``); the released
side builds its model from the same state dict. ``ZSAD_RELEASED_FULLSIZE=1`` uses the real
``ViT-L-14-336`` widths instead (random weights; slow on a CPU).

Shims applied to the released code (nothing of it is copied into the project; it is imported
from ``$ANOMALYCLIP_SRC`` with ``sys.path``/``sys.modules`` restored afterwards, so its
top-level ``loss``/``prompt_ensemble`` do not leak into other tests):

* ``AnomalyCLIP_lib/AnomalyCLIP.py:393`` ``from thop import profile`` (never used) and
  ``AnomalyCLIP_lib/model_load.py:6`` / ``prompt_ensemble.py:3`` ``from pkg_resources import
  packaging``: stub modules are put in ``sys.modules`` during the import where ``thop`` is not
  installed / ``pkg_resources`` is gone (setuptools >= 81); the stub's ``packaging`` is the
  real ``packaging`` package;
* ``model_load.py:154-161`` ``load()``: on a plain state-dict file, ``torch.jit.load`` consumes
  the open file and the fallback ``torch.load`` then hits EOF, so the test calls what ``load``
  calls next, ``build_model(name, state_dict, design_details).float()`` (lines 164-166);
* ``AnomalyCLIP.py:246`` rounds the deep text tokens to fp16 (``.half()``) in every forward
  pass: the test hands ``encode_text_learn`` the same tokens wrapped so that ``.half()`` is
  the identity; :func:`test_fp16_deep_token_quirk` checks that this rounding is the whole
  difference;
* ``AnomalyCLIP.py:387`` reads the global embedding as ``x_ori[0] @ proj`` without
  ``ln_post`` (AnomalyCLIP issue #14; the suite applies ``ln_post``): a forward hook on
  ``visual.transformer`` applies ``visual.ln_post`` to the original path's output, which
  only that line reads; :func:`test_global_token_differs_only_by_ln_post` checks that this is
  the whole difference;
* ``train.py:84`` ``label.long().cuda()``: the training step runs on the CPU. The step is
  ``train.py:73-105`` (test-time: ``test.py:73-110``) driven from this file with the
  released functions and modules (``encode_image``, ``encode_text_learn``,
  ``AnomalyCLIP_PromptLearner``, ``compute_similarity``, ``get_similarity_map``,
  ``FocalLoss``, ``BinaryDiceLoss``); ``test.py`` scores one image per call (its
  ``text_probs[:, 0, 1]`` is the first image's score only), so the released side predicts
  image by image like ``test.py`` (batch size 1).

Tolerance: maps, scores and loss terms agree to ``ATOL`` = 1e-4 absolute; gradients to 1e-4
of the largest gradient; text features (unit vectors), patch tokens and the state after the
Adam step to 1e-4 absolute. Remaining differences are float32 rounding (the suite cuts the
text sequences after the end-of-text token, batches the two attention paths together, and
smooths with a torch reimplementation of ``scipy.ndimage.gaussian_filter``).

The released code is not a project dependency. To run this test, get a checkout and point
``ANOMALYCLIP_SRC`` at it, e.g.::

    git clone https://github.com/zqhang/AnomalyCLIP /tmp/AnomalyCLIP
    ANOMALYCLIP_SRC=/tmp/AnomalyCLIP pytest --runslow tests/test_released_anomalyclip.py

Only ``AnomalyCLIP_lib/``, ``prompt_ensemble.py`` and ``loss.py`` are needed (from a mirror:
``git archive HEAD AnomalyCLIP_lib prompt_ensemble.py loss.py | tar -x -C /tmp/AnomalyCLIP``;
its ``checkpoints/`` are Git LFS objects). Their import needs ``ftfy`` and ``regex`` (installed
with open_clip) and ``scipy``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.released_code import (
    NARROW_VITL_336,
    NoHalf,
    how_to,
    isolated_import,
    max_abs_diff,
    observer,
    pkg_resources_stub,
    random_native_checkpoint,
    released_checkout,
    thop_stub,
)

pytestmark = pytest.mark.slow

HOW_TO = how_to("ANOMALYCLIP_SRC", "zqhang/AnomalyCLIP", "tests/test_released_anomalyclip.py")
RELEASED_MODULES = ("AnomalyCLIP_lib", "prompt_ensemble", "loss")


def _stub_modules() -> dict[str, types.ModuleType]:
    """Stand-ins for the released code's import-only dependencies that are missing here."""
    stubs: dict[str, types.ModuleType] = {}
    stubs.update(thop_stub())                              # AnomalyCLIP.py:393, never called
    stubs.update(pkg_resources_stub())                     # model_load.py:6, prompt_ensemble.py:3
    return stubs


def _import_released(src: Path) -> types.SimpleNamespace:
    """Import the released modules from ``src``; ``sys.path`` and ``sys.modules`` are restored
    (their ``loss``/``prompt_ensemble``/``AnomalyCLIP_lib`` and the stubs are not left behind,
    and modules of those names imported before come back)."""
    if not (src / "AnomalyCLIP_lib" / "AnomalyCLIP.py").is_file():
        raise ImportError(f"{src} has no AnomalyCLIP_lib/AnomalyCLIP.py")
    with isolated_import(src, RELEASED_MODULES, _stub_modules()):
        return types.SimpleNamespace(
            lib=importlib.import_module("AnomalyCLIP_lib"),
            build_model=importlib.import_module("AnomalyCLIP_lib.build_model").build_model,
            PromptLearner=importlib.import_module("prompt_ensemble").AnomalyCLIP_PromptLearner,
            loss=importlib.import_module("loss"),
        )

SRC, released = released_checkout("ANOMALYCLIP_SRC", "AnomalyCLIP", HOW_TO, _import_released)

ATOL = 1e-4
GRAD_RTOL = 1e-4
FULLSIZE = os.environ.get("ZSAD_RELEASED_FULLSIZE", "") not in ("", "0")
ARCH = "ViT-L-14-336" if FULLSIZE else "zsad-anomalyclip-narrow-test"
NARROW_CONFIG = NARROW_VITL_336  # real depths and patch, narrow widths
IMAGE_SIZE = 518
#: released train.sh / test.sh: --depth 9 --n_ctx 12 --t_n_ctx 4
DESIGN = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9,
          "learnabel_text_embedding_length": 4}
DPAM_LAYER = 20          # train.py / test.py: DAPM_replace(20) = V-V attention in blocks 6-24
FEATURES = [24]          # train.sh / test.sh: --features_list 24
TEMPERATURE = 0.07
LAM = 4                  # train.py:50
SIGMA = 4                # test.py --sigma
OBSERVED, _observe = observer("anomalyclip")



# -- the released side, driven like train.py / test.py ---------------------------------------

def _released_text(model, learner, *, fp16_quirk: bool = False) -> torch.Tensor:
    """test.py:73-76 / train.py:77-80: normalised (normal, anomalous) features [1, 2, D]."""
    prompts, tokenized, deep = learner(cls_id=None)
    if not fp16_quirk:
        deep = [NoHalf(p) for p in deep]
    text = model.encode_text_learn(prompts, tokenized, deep).float()
    text = torch.stack(torch.chunk(text, dim=0, chunks=2), dim=1)
    return text / text.norm(dim=-1, keepdim=True)


def _released_encode(model, images: torch.Tensor, layers, *, ln_post: bool = True):
    """test.py:90-91 / train.py:73-74 (with ``ln_post`` on the global token unless told not)."""
    def apply_ln_post(module, args, output):
        (x_vv, x_ori), tokens = output
        return [x_vv, model.visual.ln_post(x_ori)], tokens

    handle = model.visual.transformer.register_forward_hook(apply_ln_post) if ln_post else None
    try:
        glob, patches = model.encode_image(images, list(layers), DPAM_layer=DPAM_LAYER)
    finally:
        if handle is not None:
            handle.remove()
    return glob / glob.norm(dim=-1, keepdim=True), patches


def _released_maps(patches, text: torch.Tensor) -> list[torch.Tensor]:
    """test.py:97-101 / train.py:89-93: per tapped layer, probabilities [B, S, S, 2]."""
    maps = []
    for patch in patches:
        patch = patch / patch.norm(dim=-1, keepdim=True)
        similarity, _ = released.lib.compute_similarity(patch, text[0])
        maps.append(released.lib.get_similarity_map(similarity[:, 1:, :], IMAGE_SIZE))
    return maps


def _released_predict(model, text: torch.Tensor, images: torch.Tensor, layers) -> dict:
    """test.py:89-111, one image per call as test.py does (batch size 1)."""
    from scipy.ndimage import gaussian_filter

    out: dict[str, list] = {"scores": [], "global": [], "patches": [], "sims": [],
                            "maps_raw": [], "maps": []}
    with torch.no_grad():
        for image in images.split(1):
            glob, patches = _released_encode(model, image, layers)
            probs = (glob @ text.permute(0, 2, 1) / TEMPERATURE).softmax(-1)[:, 0, 1]
            sims = _released_maps(patches, text)
            amap = torch.stack([(s[..., 1] + 1 - s[..., 0]) / 2.0 for s in sims]).sum(dim=0)
            blurred = torch.stack([torch.from_numpy(gaussian_filter(m, sigma=SIGMA))
                                   for m in amap.cpu()], dim=0)
            for key, value in (("scores", probs), ("global", glob), ("maps_raw", amap),
                               ("maps", blurred)):
                out[key].append(value)
            out["patches"].append(patches)
            out["sims"].append([s.permute(0, 3, 1, 2) for s in sims])
    cat = {k: torch.cat(out[k]) for k in ("scores", "global", "maps_raw", "maps")}
    n = len(out["patches"][0])
    cat["patches"] = [torch.cat([p[i] for p in out["patches"]]) for i in range(n)]
    cat["sims"] = [torch.cat([s[i] for s in out["sims"]]) for i in range(n)]
    return cat


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights at the native 336 px, as an OpenAI/open_clip-format state dict file."""
    tmp = tmp_path_factory.mktemp("released_anomalyclip")
    return random_native_checkpoint(tmp, ARCH, None if FULLSIZE else NARROW_CONFIG)


@pytest.fixture(scope="module")
def backbone(checkpoint):
    from bench.backbone import load_clip

    return load_clip(ARCH, str(checkpoint), image_size=IMAGE_SIZE, activation="quick_gelu",
                     pos_embed_resize="bilinear")


@pytest.fixture(scope="module")
def released_clip(checkpoint):
    """model_load.py:164-166 (``load`` past its file reading), then train.py:42."""
    state = torch.load(checkpoint, map_location="cpu")
    model = released.build_model("ViT-L/14@336px", state, DESIGN).float()
    model.visual.DAPM_replace(DPAM_layer=DPAM_LAYER)
    return model.eval()


def _learnable(ours, learner) -> list[tuple]:
    """(name, our parameter, their parameter, view of theirs shaped like ours)."""
    head = ours.head
    rows = [("ctx_normal~ctx_pos", head.ctx_normal, learner.ctx_pos, lambda t: t[0, 0]),
            ("ctx_anomalous~ctx_neg", head.ctx_anomalous, learner.ctx_neg, lambda t: t[0, 0])]
    deep = zip(head.deep.tokens, learner.compound_prompts_text, strict=True)
    rows += [(f"deep[{j}]~compound_prompts_text[{j}]", a, b, lambda t: t)
             for j, (a, b) in enumerate(deep)]
    return rows


def _new_pair(backbone, released_clip, seed: int):
    """A fresh suite method and released prompt learner holding the same learnable state."""
    from methods.anomalyclip import AnomalyCLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ours = AnomalyCLIP(backbone)
        learner = released.PromptLearner(released_clip, DESIGN)
    assert learner.ctx_pos.shape == (1, 1, 12, backbone.text_width)
    assert len(learner.compound_prompts_text) == len(ours.head.deep.tokens) == 8
    with torch.no_grad():
        for _, mine, theirs, view in _learnable(ours, learner):
            view(theirs).copy_(mine)
    return ours, learner


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


@pytest.fixture(scope="module")
def inference(backbone, released_clip, images):
    """Both sides at test time on the same images and learnable state (layer 24)."""
    ours, learner = _new_pair(backbone, released_clip, seed=0)
    with torch.no_grad():
        text = _released_text(released_clip, learner)
        theirs = _released_predict(released_clip, text, images, FEATURES)
        our_text = ours.text_features()
        our_glob, our_patches = ours.image_features(images)
        pred = ours.predict({"image": images})
    return types.SimpleNamespace(ours=ours, learner=learner, text=text, theirs=theirs,
                                 our_text=our_text, our_glob=our_glob, our_patches=our_patches,
                                 pred=pred)


# -- tests -------------------------------------------------------------------------------------

def test_same_setup(backbone, released_clip, inference, checkpoint):
    """Same prompts, tokens, activation and (after the released forward) position grid."""
    from bench.backbone import resize_position_grid
    from methods.anomalyclip import AnomalyCLIP

    ours, learner = inference.ours, inference.learner
    assert backbone.activation == "quick_gelu" and backbone.num_layers == 24
    assert backbone.text_layers == 12 and backbone.grid_size == 37
    assert AnomalyCLIP.default_hparams["feature_layers"] == FEATURES
    assert ours._visual_layers() == (6, FEATURES) and ours._deep_depth() == 9
    tokens = ours.template.tokens
    theirs = torch.cat([learner.tokenized_prompts_pos.reshape(-1, 77),
                        learner.tokenized_prompts_neg.reshape(-1, 77)])
    assert torch.equal(theirs[:, :tokens.shape[1]].long(), tokens.long())
    assert not theirs[:, tokens.shape[1]:].any()
    # the released forward pass resized its position embedding in place (AnomalyCLIP.py:366-370)
    pos = released_clip.visual.positional_embedding
    our_pos = backbone.model.visual.positional_embedding
    assert pos.shape == (37 * 37 + 1, backbone.width)
    assert _observe("position embedding (bilinear 24 -> 37)", max_abs_diff(pos, our_pos)) < 1e-6
    native = torch.load(checkpoint, map_location="cpu")["visual.positional_embedding"]
    bicubic = resize_position_grid(native, (37, 37), "open_clip")  # the setting matters
    assert _observe("position embedding, open_clip's bicubic resize instead",
                    max_abs_diff(pos, bicubic)) > ATOL


def test_text_features_match(inference):
    ours = F.normalize(inference.our_text, dim=-1)
    assert _observe("text features (normalised)", max_abs_diff(ours, inference.text[0])) < ATOL


def test_patch_tokens_and_maps_match(inference):
    theirs, pred = inference.theirs, inference.pred
    (layer, ours), = inference.our_patches.items()
    assert layer == 24
    assert _observe("patch tokens, layer 24", max_abs_diff(ours, theirs["patches"][0][:, 1:])) < ATOL
    sims = inference.ours._maps(inference.our_patches, inference.our_text,
                                (IMAGE_SIZE, IMAGE_SIZE))
    assert _observe("similarity maps, layer 24", max_abs_diff(sims[0], theirs["sims"][0])) < ATOL
    raw = sum(s[:, 1] for s in sims)
    assert _observe("anomaly maps before smoothing", max_abs_diff(raw, theirs["maps_raw"])) < ATOL
    assert _observe("final maps", max_abs_diff(pred.anomaly_maps, theirs["maps"])) < ATOL


def test_image_scores_match(inference):
    theirs = inference.theirs
    assert _observe("global embedding (normalised)",
                    max_abs_diff(F.normalize(inference.our_glob, dim=-1), theirs["global"])) < ATOL
    assert _observe("image scores", max_abs_diff(inference.pred.image_scores, theirs["scores"])) < ATOL


def test_global_token_differs_only_by_ln_post(backbone, released_clip, images, inference):
    """Unpatched, the released global embedding is the original path's class token @ proj."""
    from bench.backbone import encode_image_vv

    with torch.no_grad():
        glob, patches = _released_encode(released_clip, images, FEATURES, ln_post=False)
        feats = encode_image_vv(backbone, images, start=6, layers=FEATURES)
        no_ln = F.normalize(feats.taps[24][:, 0] @ backbone.model.visual.proj, dim=-1)
        scores = (glob @ inference.text[0].T / TEMPERATURE).softmax(-1)[:, 1]
    assert max_abs_diff(patches[0], inference.theirs["patches"][0]) == 0.0
    assert _observe("released global without ln_post vs ours without ln_post",
                    max_abs_diff(glob, no_ln)) < ATOL
    _observe("image scores, released without ln_post vs with (issue #14)",
             max_abs_diff(scores, inference.theirs["scores"]))


def test_fp16_deep_token_quirk(backbone, released_clip, inference):
    """Unpatched, the released text features are those of fp16-rounded deep tokens."""
    from methods.prompt_learning import encode_text

    ours = inference.ours
    with torch.no_grad():
        quirk = _released_text(released_clip, inference.learner, fp16_quirk=True)
        emb = ours.template.embed(ours.head.contexts())
        rounded = [p.half().float() for p in ours.head.deep()]
        ours16 = F.normalize(encode_text(backbone, emb, ours.template.tokens, rounded,
                                         ours.head.deep.start), dim=-1)
        maps16 = released.lib.get_similarity_map(
            released.lib.compute_similarity(
                F.normalize(inference.theirs["patches"][0], dim=-1), quirk[0])[0][:, 1:, :],
            IMAGE_SIZE)[..., 1]
    assert _observe("text features, released fp16 quirk vs suite on fp16-rounded tokens",
                    max_abs_diff(ours16, quirk[0])) < ATOL
    assert _observe("text features, released with vs without the fp16 rounding",
                    max_abs_diff(quirk, inference.text)) > 0
    _observe("layer-24 maps, released with vs without the fp16 rounding",
             max_abs_diff(maps16, inference.theirs["maps_raw"]))


@pytest.fixture(scope="module")
def train_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    images = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    mask = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)
    mask[1, 100:220, 150:300] = 1
    mask[2, 300:420, 40:160] = 1
    mask[2, 20:60, 400:500] = 1
    return {"image": images, "mask": mask, "label": torch.tensor([0, 1, 1])}


def _released_step(model, learner, batch) -> dict[str, torch.Tensor]:
    """train.py:44-50 and 61-105 on one batch (on the CPU: no ``.cuda()`` at line 84)."""
    optimizer = torch.optim.Adam(list(learner.parameters()), lr=1e-3, betas=(0.5, 0.999))
    loss_focal, loss_dice = released.loss.FocalLoss(), released.loss.BinaryDiceLoss()
    gt = batch["mask"].clone()
    gt[gt > 0.5] = 1
    gt[gt <= 0.5] = 0
    with torch.no_grad():
        glob, patches = _released_encode(model, batch["image"], FEATURES)
    text = _released_text(model, learner)
    probs = glob.unsqueeze(1) @ text.permute(0, 2, 1)
    probs = probs[:, 0, ...] / TEMPERATURE
    image_loss = F.cross_entropy(probs.squeeze(), batch["label"].long())
    maps = [m.permute(0, 3, 1, 2) for m in _released_maps(patches, text)]
    terms = {"focal": 0.0, "dice anomalous": 0.0, "dice normal": 0.0}
    loss = 0
    for m in maps:
        parts = (loss_focal(m, gt), loss_dice(m[:, 1, :, :], gt), loss_dice(m[:, 0, :, :], 1 - gt))
        for key, part in zip(terms, parts, strict=True):
            terms[key] = terms[key] + part
            loss += part
    loss = LAM * loss
    optimizer.zero_grad()
    (loss + image_loss).backward()
    optimizer.step()
    return {"global CE": image_loss.detach(), **{k: v.detach() for k, v in terms.items()},
            "total": (loss + image_loss).detach()}


def _our_terms(ours, batch) -> dict[str, torch.Tensor]:
    """The suite's loss terms (``AnomalyCLIP.training_loss`` split up)."""
    from methods.losses import dice_loss, focal_loss
    from methods.prompt_learning import two_class_logits

    with torch.no_grad():
        text = ours.text_features()
        glob, patches = ours.image_features(batch["image"])
        maps = ours._maps(patches, text, (IMAGE_SIZE, IMAGE_SIZE))
        m = (batch["mask"] > 0.5).float()
        return {
            "global CE": F.cross_entropy(two_class_logits(glob, text, TEMPERATURE), batch["label"]),
            "focal": sum(focal_loss(p, m, gamma=2.0) for p in maps),
            "dice anomalous": sum(dice_loss(p[:, 1], m) for p in maps),
            "dice normal": sum(dice_loss(p[:, 0], 1.0 - m) for p in maps),
        }


def test_training_step_matches(backbone, released_clip, train_batch):
    """Loss terms, gradients of every learnable tensor and one Adam step (train.py)."""
    ours, learner = _new_pair(backbone, released_clip, seed=1)
    before = [a.detach().clone() for _, a, _, _ in _learnable(ours, learner)]
    assert ours.hparams["lr"] == 1e-3 and tuple(ours.hparams["betas"]) == (0.5, 0.999)
    assert ours.hparams["local_weight"] == LAM
    mine = _our_terms(ours, train_batch)
    ours.fit([train_batch], epochs=1)            # one step of the suite's own Adam loop
    mine["total"] = torch.tensor(ours.losses[0])
    theirs = _released_step(released_clip, learner, train_batch)
    for key, value in theirs.items():
        assert _observe(f"loss: {key} ({float(value):.4f})", max_abs_diff(mine[key], value)) < ATOL
    rows = _learnable(ours, learner)
    largest = max(float(t.grad.abs().max()) for _, _, t, _ in rows)
    _observe("largest gradient", largest)
    for name, a, b, view in rows:
        assert a.grad is not None and b.grad is not None
        assert _observe(f"gradient {name} / largest", max_abs_diff(a.grad, view(b.grad)) / largest) \
            < GRAD_RTOL
    for (name, a, b, view), a0 in zip(rows, before, strict=True):
        assert max_abs_diff(a, a0) > 5e-4                # the first Adam step moves by ~lr
        assert _observe(f"after Adam: {name}", max_abs_diff(a, view(b))) < ATOL


def test_multilayer_variant_maps_match(backbone, released_clip, images, inference):
    """``feature_layers=[6, 12, 18, 24]`` matches ``--features_list 6 12 18 24``."""
    from methods.anomalyclip import AnomalyCLIP

    layers = [6, 12, 18, 24]
    ours = AnomalyCLIP(backbone, feature_layers=layers)
    ours.head.load_state_dict(inference.ours.head.state_dict())
    with torch.no_grad():
        theirs = _released_predict(released_clip, inference.text, images, layers)
        pred = ours.predict({"image": images})
    assert _observe("final maps, layers 6/12/18/24", max_abs_diff(pred.anomaly_maps, theirs["maps"])) \
        < ATOL
    assert _observe("image scores, layers 6/12/18/24",
                    max_abs_diff(pred.image_scores, theirs["scores"])) < ATOL
