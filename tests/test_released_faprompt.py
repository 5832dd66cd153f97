"""Opt-in equivalence test of ``faprompt`` against the authors' released code (``--runslow``).

The released FAPrompt (github.com/mala-lab/FAPrompt, commit 7e9d9d2: ``FAPrompt.py``,
``AnomalyCLIP_lib``, ``loss.py``; ``train.py`` / ``test.py`` restated) and the suite's
``faprompt`` (``methods/faprompt.py`` on ``bench/backbone.py`` and
``methods/prompt_learning.py``) run on the SAME random weights, with the suite's learnable
state copied into the released prompt learner ``FAPrompt``: ``ctx_normal`` -> ``ctx_pos[0, 0]``,
``ctx_abnormal`` -> ``ctx_neg[0]``, ``deep.tokens[j]`` -> ``compound_prompts_text[j]``,
``prior.linear1/linear2`` -> ``patch_meta_net.linear1/linear2`` (ψ). The released learner's
``compound_prompt_projections`` are never called (no gradient) and have no counterpart.

Compared:

* inference (``test.py:93-152``, one image per call as ``test.py`` runs, batch size 1): the
  static text features, the DPAM patch tokens, the global embedding, the prior ψ(·) of each
  image, the DAP text features, both similarity maps, the anomaly map before and after the
  σ = 10 Gaussian and the image score — with ``released_prior_tokens_bug=True`` against the
  released code as it is, and with the switch off (the default) against the released lines
  with the intended gather (``pk_indx[i, k]`` instead of the loop counter ``k``);
* ONE TRAINING STEP of ``train.py:67-161`` on the same batch (2 normal, 2 anomalous images):
  the six loss terms (``L_oc`` = ``loss_ab``, the global CE, the image-level binary focal, the
  local loss on map¹ and on map², ``L_prior`` = ``loss_bias``) and the total, the gradient of
  every learnable tensor, and the state after one Adam step (lr 1e-3, betas (0.5, 0.999)) —
  with both bug switches on (``released_prior_tokens_bug``, ``released_sigmoid_bug``) against
  ``train.py`` as released, and with both off against the restated step with the intended
  gather and ``BinaryFocalLoss(logits=False)`` (the released class on the probability);
* how far the two bug switches move the gradient (printed), and the two released quirks the
  suite does not copy (the fp16 rounding of the deep tokens, the global token without
  ``ln_post``), each measured on its own.

Weights. The released ψ is hard-coded for ViT-L/14 (``FAPrompt.py:75-79``:
``Linear(768 * 10, 480) -> ReLU -> Linear(480, 768)``) and ``forward`` reshapes the 10 chosen
patch tokens with the text width (``selected_tokens.reshape(1, self.vis_dim * self.k)``,
``vis_dim`` = ``ln_final`` width), so the joint embedding and the text width must both be 768.
The model is therefore ``NARROW_VITL_336`` with the real text tower (width 768 = 12 heads of
64, 12 blocks) and embed_dim 768; the vision tower stays narrow (24 blocks of width 128 = 2
heads, patch 14, native 336 px, so DPAM from block 6, the block-24 features and deep tokens
in text blocks 2-9 hold unchanged). Drawn at random at 336 px (LayerNorm parameters and
biases perturbed), saved as an OpenAI/open_clip-format state dict; the suite loads it with
``load_clip(arch, file, image_size=518, activation="quick_gelu", pos_embed_resize="bilinear")``
(the released ``VisionTransformer.forward`` resizes the position grid 24 -> 37 bilinearly,
``AnomalyCLIP_lib/AnomalyCLIP.py:362-370``), the released side builds its model from the same
state dict. ψ's second layer is scaled by 10 after the random init so that the prior moves
the DAP prompts visibly (the comparison would otherwise barely see ψ).

Shims applied to the released code (nothing of it is copied into the project; it is imported
from ``$FAPROMPT_SRC`` with ``sys.path``/``sys.modules`` restored afterwards, so its
top-level ``loss``/``FAPrompt``/``AnomalyCLIP_lib`` do not leak into other tests):

* import-only dependencies that are missing here get stub modules during the import:
  ``thop`` (``AnomalyCLIP.py:392``, never used), ``iopath`` (``model_load.py:14``, used
  only by ``load()``'s file reading, which the test does not call) and ``pkg_resources``
  (``FAPrompt.py:3``, ``model_load.py:6``; gone from setuptools >= 81; the stub's
  ``packaging`` is the real ``packaging``, which ``FAPrompt.tokenize`` uses);
* ``model_load.py`` ``load()`` (download, TorchScript) is not used: the test calls what it
  calls for a state dict, ``build_model(name, state_dict, design_details).float()``;
* ``AnomalyCLIP.py:246`` rounds the deep text tokens to fp16 (``.half()``) in every text
  pass: the test hands ``encode_text_learn`` the same tokens wrapped so that ``.half()`` is
  the identity; :func:`test_fp16_deep_token_quirk` measures that rounding;
* ``AnomalyCLIP.py:389`` reads the global embedding as ``x_ori[0] @ proj`` without ``ln_post``
  (AnomalyCLIP issue #14; the suite applies ``ln_post``, no switch): a forward hook on
  ``visual.transformer`` applies ``visual.ln_post`` to the original path's output, which only
  that line reads; :func:`test_global_token_without_ln_post` checks that this is the whole
  difference and measures it;
* ``train.py`` and ``test.py`` are scripts (arguments, datasets, ``.to(device)``, logging),
  so their lines around the model calls are restated in :func:`_released_static_text`,
  :func:`_released_selected_tokens`, :func:`_released_dap_text`, :func:`_released_predict`
  and :func:`_released_step`; every model, prompt, similarity and loss function is theirs,
  and :func:`test_restated_lines_match_release` checks that the restated lines occur in the
  released files verbatim.

Tolerance: text features, tokens, maps, scores and loss terms agree to ``ATOL`` = 1e-4
absolute; gradients to ``GRAD_RTOL`` = 1e-4 of each tensor's largest gradient. Adam's first
step is ``lr · g / (|g| + eps)``, i.e. ``±lr`` per coordinate: the updated state agrees to
1e-3 · lr wherever ``|g| >= 1e-3 · max |g|``; below that float32 rounding may flip a sign
(at most 0.1 % of a tensor's coordinates). Remaining differences are float32 rounding (the
suite cuts the text sequences after the end-of-text token and encodes the normal prompt once
per batch, and smooths with a torch reimplementation of ``scipy.ndimage.gaussian_filter``).

Observed (2 shared CPU cores, 3-5 min; printed with ``-s``): static and DAP text features
1.2e-7, patch tokens 1.2e-7, global embedding 7.5e-8, prior ψ(·) 1.9e-7, maps¹/² <= 6.6e-7,
final maps 5.4e-7, image scores 1.8e-7 (switch on and off alike); loss terms <= 1.2e-7;
gradients <= 6.0e-6 of each tensor's largest; after Adam <= 3.0e-5 · lr where ``|g| >= 1e-3
max |g|``. What the bugs and quirks move on these weights: the prior-token switch — prior
0.22, final maps 2.9e-2, image scores 2.7e-2, gradients (both switches) up to 1.18x of the
largest; the fp16 deep tokens — text 1.3e-5, final maps 8.0e-6, image scores 4.7e-6; the
global token without ``ln_post`` — image scores 3.3e-3.

The released code is not a project dependency. To run this test, get a checkout and point
``FAPROMPT_SRC`` at it::

    git clone https://github.com/mala-lab/FAPrompt /tmp/FAPrompt
    FAPROMPT_SRC=/tmp/FAPrompt pytest --runslow tests/test_released_faprompt.py

From a bare mirror: ``git --git-dir=MIRROR archive HEAD | tar -x -C /tmp/FAPrompt``. Its
imports need ``ftfy``, ``regex`` (installed with open_clip), ``scipy`` and ``torchvision``;
``thop``, ``iopath`` and ``pkg_resources`` are stubbed where missing, so nothing has to be
installed. With the real ``iopath`` instead of the stub (pure Python, kept out of the
environment)::

    pip install --no-deps --target /tmp/fap_deps iopath portalocker
    PYTHONPATH=/tmp/fap_deps FAPROMPT_SRC=/tmp/FAPrompt pytest --runslow \
        tests/test_released_faprompt.py
"""

from __future__ import annotations

import importlib
import importlib.util
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.released_code import (
    NARROW_VITL_336,
    NoHalf,
    assert_restated,
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

HOW_TO = how_to("FAPROMPT_SRC", "mala-lab/FAPrompt", "tests/test_released_faprompt.py")
#: top-level names the released code imports absolutely
RELEASED_MODULES = ("AnomalyCLIP_lib", "FAPrompt", "loss")


def _stub_modules() -> dict[str, types.ModuleType]:
    """Stand-ins for the released code's import-only dependencies that are missing here."""
    stubs: dict[str, types.ModuleType] = {}
    stubs.update(thop_stub())                              # AnomalyCLIP.py:392, never called
    if importlib.util.find_spec("iopath") is None:        # model_load.py:14, only load() uses it
        names = ("iopath", "iopath.common", "iopath.common.file_io")
        mods = {n: types.ModuleType(n) for n in names}
        mods["iopath"].common = mods["iopath.common"]
        mods["iopath.common"].file_io = mods["iopath.common.file_io"]
        mods["iopath.common.file_io"].PathManagerFactory = types.SimpleNamespace(
            get=lambda key=None: None)                    # model_load.py:33 at import time
        stubs.update(mods)
    stubs.update(pkg_resources_stub())                     # FAPrompt.py:3, model_load.py:6
    return stubs


def _import_released(src: Path) -> types.SimpleNamespace:
    """Import the released modules from ``src``; ``sys.path`` and ``sys.modules`` are restored
    (their ``loss``/``FAPrompt``/``AnomalyCLIP_lib`` and the stubs are not left behind, and
    modules of those names imported before come back)."""
    for rel in ("AnomalyCLIP_lib/AnomalyCLIP.py", "FAPrompt.py", "loss.py"):
        if not (src / rel).is_file():
            raise ImportError(f"{src} has no {rel}")
    with isolated_import(src, RELEASED_MODULES, _stub_modules()):
        return types.SimpleNamespace(
            lib=importlib.import_module("AnomalyCLIP_lib"),
            build_model=importlib.import_module("AnomalyCLIP_lib.build_model").build_model,
            PromptLearner=importlib.import_module("FAPrompt").FAPrompt,
            loss=importlib.import_module("loss"),
        )

SRC, released = released_checkout("FAPROMPT_SRC", "FAPrompt", HOW_TO, _import_released)

ATOL = 1e-4
GRAD_RTOL = 1e-4
ARCH = "zsad-faprompt-narrow-test"
#: NARROW_VITL_336 with ViT-L/14's text tower and joint width (768): ψ is hard-coded to 768
CONFIG = {"embed_dim": 768, "vision_cfg": dict(NARROW_VITL_336["vision_cfg"]),
          "text_cfg": {**NARROW_VITL_336["text_cfg"], "width": 768, "heads": 12}}
IMAGE_SIZE = 518
#: train.sh / test.sh: --depth 9 --n_ctx 12 --t_n_ctx 4
DESIGN = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9,
          "learnabel_text_embedding_length": 4}
DPAM_LAYER = 20          # train.py:48 / test.py:80: DAPM_replace(DPAM_layer=20), blocks 6-24
FEATURES = [6, 12, 18, 24]   # --features_list (passed to encode_image, which ignores it)
SIGMA = 10               # test.py --sigma default (test.sh passes none)
LR = 1e-3                # train.py --learning_rate default; train.sh passes none
ON = {"released_prior_tokens_bug": True, "released_sigmoid_bug": True}
OFF = {"released_prior_tokens_bug": False, "released_sigmoid_bug": False}
OBSERVED, _observe = observer("faprompt")



# -- the released side, driven like train.py / test.py ---------------------------------------

def _deep(compound_prompts_text, fp16_quirk: bool) -> list:
    return list(compound_prompts_text) if fp16_quirk else [NoHalf(p) for p in compound_prompts_text]


def _released_encode(model, image: torch.Tensor, *, ln_post: bool = True):
    """train.py:77-79 / test.py:93-95 (with ``ln_post`` on the global token unless told not):
    normalised global embedding [B, D], raw patch features [N + 1, B, D] (sequence first)."""
    def apply_ln_post(module, args, output):
        (x_vv, x_ori), tokens = output
        return [x_vv, model.visual.ln_post(x_ori)], tokens

    handle = model.visual.transformer.register_forward_hook(apply_ln_post) if ln_post else None
    try:
        with torch.no_grad():
            image_features, patch_features = model.encode_image(image, FEATURES,
                                                                DPAM_layer=DPAM_LAYER)
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    finally:
        if handle is not None:
            handle.remove()
    return image_features, patch_features


def _released_static_text(model, learner, *, fp16_quirk: bool = False):
    """train.py:81-96 / test.py:97-104: (normalised [1, 2, D] text, raw abnormal [K, D])."""
    prompts_pos, prompts_neg, tokenized_prompt_pos, tokenized_prompt_neg, \
        compound_prompts_text, _ = learner.forward()
    deep = _deep(compound_prompts_text, fp16_quirk)
    text_features_pos = model.encode_text_learn(prompts_pos, tokenized_prompt_pos, deep).float()
    text_features_neg = model.encode_text_learn(prompts_neg, tokenized_prompt_neg, deep).float()
    raw_neg = text_features_neg
    text_features_neg = torch.mean(text_features_neg, dim=0, keepdim=True)
    text_features = torch.cat([text_features_pos, text_features_neg])
    text_features = torch.stack(torch.chunk(text_features, dim=0, chunks=2), dim=1)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return text_features, raw_neg


def _released_selected_tokens(similarity, patch_features, *, intended: bool = False):
    """train.py:103-113 / test.py:112-122: the tokens ψ reads [B, 10, D] and ``pk_indx``.

    As released the gather index is the loop counter ``k`` (patches 0-9); ``intended=True``
    uses ``pk_indx[i, k]``, the top-10 patch the loop means to read."""
    pk_value, pk_indx = torch.topk(similarity[1:, :, 1], k=10, dim=0, largest=True, sorted=True)
    pk_indx = pk_indx.permute(1, 0)
    selected_tokens = []
    for i in range(len(pk_indx)):
        selected_tokens2 = []
        for k in range(len(pk_indx[0])):
            j = pk_indx[i, k] if intended else k
            tmp_token = patch_features[1:, :, :].permute(1, 0, 2)[i, j, :]
            selected_tokens2.append(tmp_token)
        selected_tokens2 = torch.stack(selected_tokens2)
        selected_tokens.append(selected_tokens2)
    selected_tokens = torch.stack(selected_tokens)
    return selected_tokens, pk_indx


def _released_dap_text(model, learner, selected_tokens, *, fp16_quirk: bool = False):
    """train.py:115-133 / test.py:124-134: normalised per-image text [B, 2, D], priors [B, W]."""
    text_features_list, biases = [], []
    for i in range(len(selected_tokens)):
        prompts_pos, prompts_neg, tokenized_prompt_pos, tokenized_prompt_neg, \
            compound_prompts_text, bias = learner.forward(selected_tokens=selected_tokens[i])
        deep = _deep(compound_prompts_text, fp16_quirk)
        text_features_pos = model.encode_text_learn(prompts_pos, tokenized_prompt_pos,
                                                    deep).float()
        text_features_neg = model.encode_text_learn(prompts_neg, tokenized_prompt_neg,
                                                    deep).float()
        text_features_neg = torch.mean(text_features_neg, dim=0, keepdim=True)
        text_features = torch.cat([text_features_pos, text_features_neg])
        text_features_list.append(text_features)
        biases.append(bias.squeeze(0))
    text_features = torch.stack(text_features_list)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return text_features, torch.stack(biases)


def _released_predict(model, learner, images: torch.Tensor, *, intended: bool = False,
                      fp16_quirk: bool = False, ln_post: bool = True) -> dict[str, torch.Tensor]:
    """test.py:93-152, one image per call as test.py does (its ``text_probs[:, 0, 1]`` scores
    only the first image of a batch)."""
    from scipy.ndimage import gaussian_filter

    lib = released.lib
    keys = ("score", "global", "patches", "text1", "text2", "prior", "pk_indx", "map1", "map2",
            "raw", "map")
    out: dict[str, list] = {k: [] for k in keys}
    with torch.no_grad():
        for image in images.split(1):
            image_features, patch_features = _released_encode(model, image, ln_post=ln_post)
            text1, _ = _released_static_text(model, learner, fp16_quirk=fp16_quirk)
            patch_features = patch_features / patch_features.norm(dim=-1, keepdim=True)
            similarity, _ = lib.compute_similarity_ori(patch_features, text1[0])
            similarity_map1 = lib.get_similarity_map(similarity[1:, :], IMAGE_SIZE)
            map_max_score1 = similarity[1:, :, 1].max(dim=0).values
            similarity_map1 = similarity_map1.squeeze(0)
            selected, pk_indx = _released_selected_tokens(similarity, patch_features,
                                                          intended=intended)
            text2, prior = _released_dap_text(model, learner, selected, fp16_quirk=fp16_quirk)
            text_probs = image_features @ text2.permute(0, 2, 1)
            text_probs = (text_probs / 0.07).softmax(-1)
            text_probs = text_probs[:, 0, 1]
            similarity, _ = lib.compute_similarity(patch_features, text2)
            map_max_score2 = similarity[1:, :, 1].max(dim=0).values
            similarity_map2 = lib.get_similarity_map(similarity[1:, :], IMAGE_SIZE)
            similarity_map2 = similarity_map2.squeeze(0)
            anomaly_map = (similarity_map1[1, :] + 1 - similarity_map1[0, :]
                           + similarity_map2[1, :] + 1 - similarity_map2[0, :]) / 4.0
            map_max_score = (2 * map_max_score1 + map_max_score2) / 3
            tmp = 0.5 * (text_probs + map_max_score)
            raw = anomaly_map
            anomaly_map = anomaly_map.unsqueeze(0).unsqueeze(0)
            anomaly_map = torch.Tensor(gaussian_filter(anomaly_map.detach().cpu(), sigma=SIGMA))
            for key, value in (("score", tmp), ("global", image_features),
                               ("patches", patch_features[1:].permute(1, 0, 2)),
                               ("text1", text1[0]), ("text2", text2), ("prior", prior),
                               ("pk_indx", pk_indx), ("map1", similarity_map1[None]),
                               ("map2", similarity_map2[None]), ("raw", raw[None]),
                               ("map", anomaly_map[0])):
                out[key].append(value)
    res = {k: torch.cat(v) for k, v in out.items() if k != "text1"}
    res["text1"] = out["text1"][0]      # the static prompts: the same for every image
    return res


def _released_step(model, learner, batch, *, intended: bool = False,
                   fp16_quirk: bool = False) -> dict[str, torch.Tensor]:
    """train.py:49-55 and 67-161 on one batch, on the CPU. ``intended=True``: the top-10
    gather and ``BinaryFocalLoss(logits=False)`` (the loss applied to the probability)."""
    lib, loss = released.lib, released.loss
    optimizer = torch.optim.Adam(list(learner.parameters()), lr=LR, betas=(0.5, 0.999))
    loss_focal = loss.FocalLoss()
    loss_dice = loss.BinaryDiceLoss()
    loss_fun = loss.BinaryFocalLoss(logits=False) if intended else loss.BinaryFocalLoss()
    loss_mse = torch.nn.MSELoss()
    image, label = batch["image"], batch["label"]
    gt = batch["mask"][:, None].clone().squeeze()
    gt[gt > 0.5] = 1
    gt[gt <= 0.5] = 0
    image_features, patch_features = _released_encode(model, image)
    text_features, text_features_neg = _released_static_text(model, learner,
                                                             fp16_quirk=fp16_quirk)
    loss_ab = 0
    for k in range(len(text_features_neg) - 1):
        for m in range(k + 1, len(text_features_neg)):
            loss_ab = loss_ab + abs(torch.dot(text_features_neg[k], text_features_neg[m]) / (
                torch.norm(text_features_neg[k]) * torch.norm(text_features_neg[m])))
    patch_features = patch_features / patch_features.norm(dim=-1, keepdim=True)
    similarity, _ = lib.compute_similarity_ori(patch_features, text_features[0])
    similarity_map1 = lib.get_similarity_map(similarity[1:, :], IMAGE_SIZE)
    map_max_score1 = similarity[1:, :, 1].max(dim=0).values
    selected_tokens, _ = _released_selected_tokens(similarity, patch_features, intended=intended)
    text_features, biases = _released_dap_text(model, learner, selected_tokens,
                                               fp16_quirk=fp16_quirk)
    loss_bias = 0.0
    for i in range(len(selected_tokens)):
        bias_gt0 = torch.zeros(biases.shape[-1])
        if label[i] == 0:
            loss_tmp = loss_mse(biases[i], bias_gt0)
            loss_bias = loss_bias + loss_tmp
    similarity, _ = lib.compute_similarity(patch_features, text_features)
    similarity_map2 = lib.get_similarity_map(similarity[1:, :], IMAGE_SIZE)
    map_max_score2 = similarity[1:, :, 1].max(dim=0).values
    text_probs = image_features.unsqueeze(1) @ text_features.permute(0, 2, 1)
    text_probs = text_probs[:, 0, ...] / 0.07
    image_loss = F.cross_entropy(text_probs.squeeze(), label.long())
    tmp = (text_probs).softmax(-1)
    tmp = tmp[:, 1]
    map_max_score = (2 * map_max_score1 + map_max_score2) / 3
    score2 = 0.5 * (tmp + map_max_score)
    image_loss2 = loss_fun(score2, label.float())
    local1 = (loss_focal(similarity_map1, gt) + loss_dice(similarity_map1[:, 1, :, :], gt)
              + loss_dice(similarity_map1[:, 0, :, :], 1 - gt))
    local2 = (loss_focal(similarity_map2, gt) + loss_dice(similarity_map2[:, 1, :, :], gt)
              + loss_dice(similarity_map2[:, 0, :, :], 1 - gt))
    total = local1 + 0.5 * local2 + image_loss + image_loss2 + 0.1 * loss_ab + loss_bias
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    terms = {"static_map": local1, "dap_map": local2, "global": image_loss,
             "image": image_loss2, "orthogonal": loss_ab, "prior": loss_bias, "total": total}
    return {k: v.detach() for k, v in terms.items()}


#: (file, line) pairs restated above; whitespace-stripped, each must occur in the file.
RESTATED = [
    ("train.py", "model.visual.DAPM_replace(DPAM_layer = 20)"),
    ("train.py", "optimizer = torch.optim.Adam(list(prompt_learner.parameters()), "
                 "lr=args.learning_rate, betas=(0.5, 0.999))"),
    ("train.py", "loss_fun = BinaryFocalLoss()"),
    ("train.py", "gt = items['img_mask'].squeeze().to(device)"),
    ("train.py", "image_features, patch_features = model.encode_image(image, "
                 "args.features_list, DPAM_layer = 20)"),
    ("train.py", "loss_ab = loss_ab + abs(torch.dot(text_features_neg[k], text_features_neg[m])"
                 " / ("),
    ("train.py", "text_features_neg = torch.mean(text_features_neg, dim=0, keepdim=True)"),
    ("train.py", "similarity, _ = AnomalyCLIP_lib.compute_similarity_ori(patch_features, "
                 "text_features[0])"),
    ("train.py", "pk_value, pk_indx = torch.topk(similarity[1:, :, 1], k=10, dim = 0, "
                 "largest=True, sorted=True)"),
    ("train.py", "tmp_token = patch_features[1:, :, :].permute(1, 0, 2)[i, k, :]"),
    ("test.py", "tmp_token = patch_features[1:, :, :].permute(1, 0, 2)[i, k, :]"),
    ("train.py", "prompts_pos, prompts_neg, tokenized_prompt_pos, tokenized_prompt_neg, "
                 "compound_prompts_text, bias = prompt_learner.forward(selected_tokens = "
                 "selected_tokens[i])"),
    ("train.py", "loss_tmp = loss_mse(bias.squeeze(0), bias_gt0)"),
    ("train.py", "similarity, _ = AnomalyCLIP_lib.compute_similarity(patch_features, "
                 "text_features)"),
    ("train.py", "text_probs = image_features.unsqueeze(1) @ text_features.permute(0, 2, 1)"),
    ("train.py", "image_loss = F.cross_entropy(text_probs.squeeze(), label.long().to(device))"),
    ("train.py", "map_max_score = (2 * map_max_score1 + map_max_score2)/3"),
    ("train.py", "score2 = 0.5 * (tmp + map_max_score)"),
    ("train.py", "image_loss2 = loss_fun(score2, label.float().to(device))"),
    ("train.py", "loss += 0.5 * loss_dice(similarity_map2[:, 0, :, :], 1 - gt)"),
    ("train.py", "(loss + image_loss + image_loss2 + 0.1*loss_ab + loss_bias).backward()"),
    ("train.py", 'parser.add_argument("--learning_rate", type=float, default=0.001, '
                 'help="learning rate")'),
    ("test.py", "model.visual.DAPM_replace(DPAM_layer=20)"),
    ("test.py", "test_dataloader = torch.utils.data.DataLoader(test_data, batch_size=1, "
                "shuffle=False)"),
    ("test.py", "text_probs = image_features @ text_features.permute(0, 2, 1)"),
    ("test.py", "text_probs = (text_probs / 0.07).softmax(-1)"),
    ("test.py", "anomaly_map = (similarity_map1[1, :] + 1 - similarity_map1[0, :] + "
                "similarity_map2[1, :] + 1 - similarity_map2[0, :]) / 4.0"),
    ("test.py", "tmp = 0.5 * (text_probs + map_max_score)"),
    ("test.py", "anomaly_map = torch.Tensor(gaussian_filter(anomaly_map.detach().cpu(), "
                "sigma=args.sigma))"),
    ("test.py", 'parser.add_argument("--sigma", type=int, default=10, help="zero shot")'),
    ("train.sh", "--features_list 6 12 18 24 --image_size 518  --batch_size 8"),
    ("train.sh", "--depth ${depth[i]} --n_ctx ${n_ctx[j]} --t_n_ctx ${t_n_ctx[0]}"),
]


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights at the native 336 px, as an OpenAI/open_clip-format state dict file."""
    tmp = tmp_path_factory.mktemp("released_faprompt")
    return random_native_checkpoint(tmp, ARCH, CONFIG)


@pytest.fixture(scope="module")
def backbone(checkpoint):
    from bench.backbone import load_clip

    return load_clip(ARCH, str(checkpoint), image_size=IMAGE_SIZE, activation="quick_gelu",
                     pos_embed_resize="bilinear")


@pytest.fixture(scope="module")
def released_clip(checkpoint):
    """model_load.py:172-174 (``load`` past its file reading), then train.py:48."""
    state = torch.load(checkpoint, map_location="cpu")
    model = released.build_model("ViT-L/14@336px", state, DESIGN).float()
    model.visual.DAPM_replace(DPAM_layer=DPAM_LAYER)
    return model.eval()


def _learnable(ours, learner) -> list[tuple]:
    """(name, our parameter, their parameter, view of theirs shaped like ours)."""
    head = ours.head
    rows = [("ctx_normal~ctx_pos", head.ctx_normal, learner.ctx_pos, lambda t: t[0, 0]),
            ("ctx_abnormal~ctx_neg", head.ctx_abnormal, learner.ctx_neg, lambda t: t[0])]
    deep = zip(head.deep.tokens, learner.compound_prompts_text, strict=True)
    rows += [(f"deep[{j}]~compound_prompts_text[{j}]", a, b, lambda t: t)
             for j, (a, b) in enumerate(deep)]
    for layer in ("linear1", "linear2"):
        for kind in ("weight", "bias"):
            rows.append((f"prior.{layer}.{kind}~patch_meta_net.{layer}.{kind}",
                         getattr(getattr(head.prior, layer), kind),
                         getattr(getattr(learner.patch_meta_net, layer), kind), lambda t: t))
    assert {id(r[1]) for r in rows} == {id(p) for p in head.parameters()}
    unused = {id(p) for p in learner.compound_prompt_projections.parameters()}
    assert {id(r[2]) for r in rows} == {id(p) for p in learner.parameters()} - unused
    return rows


def _new_pair(backbone, released_clip, seed: int, **hp):
    """A fresh suite method and released prompt learner holding the same learnable state."""
    from methods.faprompt import FAPrompt

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ours = FAPrompt(backbone, **hp)
        learner = released.PromptLearner(released_clip, DESIGN)
    with torch.no_grad():
        ours.head.prior.linear2.weight.mul_(10)    # a prior that visibly moves the DAP prompts
    assert learner.ctx_pos.shape == (1, 1, 5, backbone.text_width)
    assert learner.ctx_neg.shape == (1, 10, 2, backbone.text_width)
    with torch.no_grad():
        for _, mine, theirs, view in _learnable(ours, learner):
            view(theirs).copy_(mine)
    return ours, learner


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def _infer(backbone, released_clip, images, hp: dict, *, intended: bool):
    ours, learner = _new_pair(backbone, released_clip, seed=0, **hp)
    with torch.no_grad():
        theirs = _released_predict(released_clip, learner, images, intended=intended)
        out = ours.outputs(images)
        pred = ours.predict({"image": images})
        glob, patches = ours.image_features(images)
        normal, abnormal = ours.static_text()
    return types.SimpleNamespace(ours=ours, learner=learner, theirs=theirs, out=out, pred=pred,
                                 glob=glob, patches=patches, normal=normal, abnormal=abnormal)


@pytest.fixture(scope="module")
def inference_on(backbone, released_clip, images):
    """Switch on vs test.py as released (ψ reads patches 0-9)."""
    return _infer(backbone, released_clip, images, ON, intended=False)


@pytest.fixture(scope="module")
def inference_off(backbone, released_clip, images):
    """Switch off (default) vs test.py with the intended top-10 gather."""
    return _infer(backbone, released_clip, images, OFF, intended=True)


@pytest.fixture(scope="module")
def train_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    images = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    mask = torch.zeros(4, IMAGE_SIZE, IMAGE_SIZE)
    mask[1, 100:220, 150:300] = 1
    mask[3, 300:420, 40:160] = 1
    mask[3, 20:60, 400:500] = 1
    images[mask[:, None].expand_as(images) > 0] += 1.0
    return {"image": images, "mask": mask, "label": torch.tensor([0, 1, 0, 1])}


# -- tests -------------------------------------------------------------------------------------

def test_restated_lines_match_release():
    assert_restated(Path(SRC).expanduser(), RESTATED)


def test_same_setup(backbone, released_clip, inference_on, checkpoint):
    """Prompts, tokens, hyper-parameters, ψ's sizes and (after the released forward) the
    position grid are the released ones; the released loss class defaults to logits."""
    from bench.backbone import resize_position_grid
    from methods.faprompt import FAPrompt

    ours, learner = inference_on.ours, inference_on.learner
    hp = FAPrompt.default_hparams
    assert backbone.activation == "quick_gelu" and backbone.num_layers == 24
    assert backbone.text_layers == 12 and backbone.grid_size == 37
    assert ours._visual_layers() == (6, [24]) and ours._deep_depth() == 9
    assert (learner.n_ctx_pos, learner.n_ctx_neg, learner.num_p, learner.k) == (
        hp["n_normal_ctx"], hp["n_abnormal_ctx"], hp["n_abnormal_prompts"], hp["prior_top_k"])
    assert hp["lr"] == LR and tuple(hp["betas"]) == (0.5, 0.999) and hp["sigma"] == SIGMA
    meta = learner.patch_meta_net
    assert (meta.linear1.in_features, meta.linear1.out_features, meta.linear2.out_features) \
        == (7680, 480, 768)
    assert released.loss.BinaryFocalLoss().logits is True       # loss.py:89 (the sigmoid bug)
    # ViT-L/14's count (text width and joint width 768 here, as there): docs/methods.md
    unused = sum(p.numel() for p in learner.compound_prompt_projections.parameters())
    assert sum(p.numel() for p in ours.head.parameters()) == 4_100_064
    assert sum(p.numel() for p in learner.parameters()) - unused == 4_100_064
    assert unused == 5_512_192
    # the same token ids wherever the text is not a learnable placeholder
    for template, tok, n in ((ours.normal_template, learner.tokenized_prompts_pos, 5),
                             (ours.abnormal_template, learner.tokenized_prompts_neg, 7)):
        theirs = tok.reshape(-1, 77).long()
        mine = template.tokens.long()
        L = mine.shape[1]
        assert torch.equal(theirs[:, :1], mine.expand(len(theirs), -1)[:, :1])
        assert torch.equal(theirs[:, 1 + n:L], mine.expand(len(theirs), -1)[:, 1 + n:])
        assert not theirs[:, L:].any()
    # the released forward pass resized its position embedding in place (AnomalyCLIP.py:366-370)
    pos = released_clip.visual.positional_embedding
    assert _observe("position embedding (bilinear 24 -> 37)",
                    max_abs_diff(pos, backbone.model.visual.positional_embedding)) < 1e-6
    native = torch.load(checkpoint, map_location="cpu")["visual.positional_embedding"]
    assert max_abs_diff(pos, resize_position_grid(native, (37, 37), "bilinear")) < 1e-6


@pytest.mark.parametrize("which", ["on", "off"])
def test_inference_matches(which, request):
    """``test.py`` vs ``predict``: switch on vs as released, switch off vs the intended gather."""
    r = request.getfixturevalue(f"inference_{which}")
    theirs, out, label = r.theirs, r.out, f"switch {which}:"
    text1 = F.normalize(torch.stack([r.normal, r.abnormal.mean(0)]), dim=-1)
    assert _observe(f"{label} static text features", max_abs_diff(text1, theirs["text1"])) < ATOL
    (layer, patches), = r.patches.items()
    assert layer == 24
    assert _observe(f"{label} patch tokens, layer 24",
                    max_abs_diff(F.normalize(patches, dim=-1), theirs["patches"])) < ATOL
    assert _observe(f"{label} global embedding (normalised)",
                    max_abs_diff(F.normalize(r.glob, dim=-1), theirs["global"])) < ATOL
    assert torch.equal(out["prior_index"], theirs["pk_indx"] if which == "off"
                       else torch.arange(10).expand(len(theirs["pk_indx"]), -1))
    assert _observe(f"{label} prior ψ(tokens)", max_abs_diff(out["prior"], theirs["prior"])) < ATOL
    assert float(out["prior"].abs().max()) > 0.05      # the prior is not negligible
    dap = F.normalize(torch.stack([r.normal.expand(len(out["prior"]), -1),
                                   r.ours.dap_abnormal_text(out["prior"]).mean(1)], dim=1), dim=-1)
    assert _observe(f"{label} DAP text features", max_abs_diff(dap, theirs["text2"])) < ATOL
    assert _observe(f"{label} map¹ (static prompts)",
                    max_abs_diff(out["map_static"], theirs["map1"])) < ATOL
    assert _observe(f"{label} map² (DAP prompts)", max_abs_diff(out["map_dap"], theirs["map2"])) < ATOL
    assert max_abs_diff(theirs["map1"], theirs["map2"]) > 100 * ATOL   # the DAP changes the maps
    m1, m2 = out["map_static"], out["map_dap"]
    raw = (m1[:, 1] + 1 - m1[:, 0] + m2[:, 1] + 1 - m2[:, 0]) / 4.0
    assert _observe(f"{label} anomaly map before smoothing", max_abs_diff(raw, theirs["raw"])) < ATOL
    assert _observe(f"{label} final map (σ = 10)", max_abs_diff(r.pred.anomaly_maps, theirs["map"])) \
        < ATOL
    assert _observe(f"{label} image score", max_abs_diff(r.pred.image_scores, theirs["score"])) < ATOL
    assert float(theirs["map"].std()) > 1e-4


def test_prior_token_switch_matters(inference_on, inference_off):
    """The released gather (patches 0-9) and the top-10 read different tokens, priors, maps."""
    idx = inference_off.theirs["pk_indx"]
    assert not torch.equal(idx, torch.arange(10).expand(len(idx), -1))
    _observe("prior, patches 0-9 vs top-10",
             max_abs_diff(inference_on.theirs["prior"], inference_off.theirs["prior"]))
    _observe("final map, patches 0-9 vs top-10",
             max_abs_diff(inference_on.theirs["map"], inference_off.theirs["map"]))
    _observe("image score, patches 0-9 vs top-10",
             max_abs_diff(inference_on.theirs["score"], inference_off.theirs["score"]))


def test_global_token_without_ln_post(released_clip, images, inference_on):
    """Unpatched, the released global embedding is the original path's class token @ proj
    (no switch in the suite); everything else is unchanged."""
    from bench.backbone import encode_image_vv

    r = inference_on
    backbone = r.ours.backbone
    with torch.no_grad():
        raw = _released_predict(released_clip, r.learner, images, ln_post=False)
        feats = encode_image_vv(backbone, images, start=6, layers=[24])
        no_ln = F.normalize(feats.taps[24][:, 0] @ backbone.model.visual.proj, dim=-1)
    assert max_abs_diff(raw["map"], r.theirs["map"]) == 0.0
    assert _observe("released global without ln_post vs ours without ln_post",
                    max_abs_diff(raw["global"], no_ln)) < ATOL
    _observe("image scores, released without ln_post vs with (issue #14)",
             max_abs_diff(raw["score"], r.theirs["score"]))


def test_fp16_deep_token_quirk(released_clip, images, inference_on):
    """Unpatched, the released text passes use fp16-rounded deep tokens."""
    from methods.prompt_learning import encode_text

    r = inference_on
    ours, backbone = r.ours, r.ours.backbone
    with torch.no_grad():
        quirk = _released_predict(released_clip, r.learner, images, fp16_quirk=True)
        tmpl = ours.normal_template
        emb = tmpl.embed(ours.head.ctx_normal.unsqueeze(0))
        rounded = [p.half().float() for p in ours.head.deep()]
        normal16 = encode_text(backbone, emb, tmpl.tokens, rounded, ours.head.deep.start)[0]
        tmpl = ours.abnormal_template
        emb = torch.cat([tmpl.prefix.expand(10, -1, -1), ours.head.abnormal_contexts(),
                         tmpl.suffix.expand(10, -1, -1)], dim=1)
        abnormal16 = encode_text(backbone, emb, tmpl.tokens.expand(10, -1), rounded,
                                 ours.head.deep.start)
        text16 = F.normalize(torch.stack([normal16, abnormal16.mean(0)]), dim=-1)
    assert _observe("static text, released fp16 quirk vs suite on fp16-rounded tokens",
                    max_abs_diff(text16, quirk["text1"])) < ATOL
    _observe("static text, released with vs without the fp16 rounding",
             max_abs_diff(quirk["text1"], r.theirs["text1"]))
    _observe("final maps, released with vs without the fp16 rounding",
             max_abs_diff(quirk["map"], r.theirs["map"]))
    _observe("image scores, released with vs without the fp16 rounding",
             max_abs_diff(quirk["score"], r.theirs["score"]))


def _compare_step(backbone, released_clip, batch, hp: dict, *, intended: bool, label: str):
    """One step on both sides; returns the suite's gradients (by name)."""
    ours, learner = _new_pair(backbone, released_clip, seed=1, **hp)
    rows = _learnable(ours, learner)
    before = {name: a.detach().clone() for name, a, _, _ in rows}
    mine = {k: v.detach() for k, v in ours.loss_terms(batch).items()}
    ours.fit([batch], epochs=1)                  # one step of the suite's own Adam loop
    mine["total"] = torch.tensor(ours.losses[0])
    theirs = _released_step(released_clip, learner, batch, intended=intended)
    for key, value in theirs.items():
        assert _observe(f"{label} loss {key} ({float(value):.4f}) |diff|",
                        max_abs_diff(mine[key], value)) < ATOL, key
    assert float(theirs["prior"]) > 0 and float(theirs["orthogonal"]) > 0
    grads, worst, worst_step = {}, 0.0, 0.0
    for name, a, b, view in rows:
        assert a.grad is not None and b.grad is not None, name
        g_t = view(b.grad)
        scale = float(g_t.abs().max())
        assert scale > 0, name
        rel = max_abs_diff(a.grad, g_t) / scale
        print(f"[released faprompt] {label} grad {name}: |diff| / max |grad| = {rel:.2e}")
        worst = max(worst, rel)
        assert rel < GRAD_RTOL, (name, rel)
        grads[name] = a.grad.detach().clone()
        # Adam's first step is lr * g / (|g| + eps): equal wherever float32 keeps g's sign
        d = (a.detach() - view(b.detach())).abs()
        tiny = g_t.abs() < 1e-3 * scale
        worst_step = max(worst_step, float(d[~tiny].max()) / LR)
        assert float(d[~tiny].max()) < 1e-3 * LR, name
        assert float(d.max()) <= 2 * LR * (1 + 1e-3), name
        flipped = int((d > 1e-3 * LR).sum())
        assert flipped <= max(1, d.numel() // 1000), (name, flipped)
        assert max_abs_diff(a, before[name]) > 0.5 * LR, name        # the step moved it
    _observe(f"{label} max grad |diff| / max |grad|", worst)
    _observe(f"{label} max Adam step |diff| / lr (|g| >= 1e-3 max |g|)", worst_step)
    return grads


@pytest.fixture(scope="module")
def step_on(backbone, released_clip, train_batch) -> dict[str, torch.Tensor]:
    return _compare_step(backbone, released_clip, train_batch, ON, intended=False,
                         label="step (switches on vs released)")


def test_training_step_switches_on(step_on):
    """Both bug switches on vs train.py as released: terms, gradients, Adam step (the
    comparison runs in the ``step_on`` fixture)."""
    assert len(step_on) == 14


def test_training_step_switches_off(backbone, released_clip, train_batch, step_on):
    """Both switches off (default) vs train.py with the top-10 gather and the focal on the
    probability; and how far the switches move the gradient."""
    off = _compare_step(backbone, released_clip, train_batch, OFF, intended=True,
                        label="step (switches off vs released, intended)")
    rel = max(max_abs_diff(off[k], step_on[k]) / float(step_on[k].abs().max()) for k in step_on)
    _observe("max |grad off - grad on| / max |grad on| (per tensor)", rel)
    assert rel > 100 * GRAD_RTOL
