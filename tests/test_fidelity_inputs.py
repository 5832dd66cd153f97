"""What the suite feeds each method: activation, position-embedding resize, class words, masks.

Issue 14: the inputs must be what each method's authors ran (``full``) or one correct
configuration for all (``full_uniform``). Every check compares against an independent
computation (open_clip's own modules and loader, ``F.interpolate``, torchvision's transforms).
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bench import protocol as protocol_mod
from bench.backbone import (
    BackboneError,
    is_openai_weights,
    load_clip,
    native_image_size,
    resolve_activation,
)
from bench.data import load_mask
from bench.feature_cache import FeatureCache
from bench.registry import ADAPTERS, METHODS
from bench.runner import load_backbone

ARCH = "zsad-tiny"  # open_clip config without quick_gelu, like ViT-L-14-336's


def _quick_gelu_modules(model: torch.nn.Module) -> tuple[int, int]:
    kinds = [type(m).__name__ for m in model.modules()]
    return kinds.count("QuickGELU"), kinds.count("GELU")


def _proto(name: str) -> protocol_mod.Protocol:
    return protocol_mod.validate(protocol_mod.load(name), methods=METHODS.names(),
                                 datasets=ADAPTERS.names())


@pytest.fixture(scope="module")
def native_state(tmp_path_factory) -> Path:
    """A random zsad-tiny state dict at its native size, saved as a plain file (no 'openai')."""
    model = open_clip.create_model(ARCH, pretrained=None)
    path = tmp_path_factory.mktemp("ckpt") / "weights.bin"
    torch.save(model.state_dict(), path)
    return path


# -- activation ------------------------------------------------------------------------
def test_full_protocols_give_quick_gelu_to_every_openai_backbone_even_from_a_file():
    """The documented offline route: [backbone] pretrained = a weights file without 'openai'."""
    seen = 0
    for name in ("full", "full_uniform"):
        proto = _proto(name)
        for m in proto.methods:
            spec = proto.backbone_for(m)
            if spec.pretrained != "openai":
                continue
            seen += 1
            as_file = dataclasses.replace(spec, pretrained="/data/weights/model.bin")
            assert resolve_activation(as_file.arch, as_file.pretrained, as_file.activation) == \
                "quick_gelu", (name, m)
            assert resolve_activation(spec.arch, spec.pretrained, spec.activation) == "quick_gelu"
    assert seen >= 2 * 10
    # the LAION backbones of full.toml's WinCLIP/AnoCLIP keep open_clip's GELU
    spec = _proto("full").backbone_for("winclip")
    assert spec.pretrained.startswith("laion")
    assert resolve_activation(spec.arch, spec.pretrained, spec.activation) == "gelu"


def test_full_protocol_spec_loads_quick_gelu_from_a_plain_weights_file(native_state: Path):
    """full.toml's [backbone] settings, with a tiny architecture and a file, build QuickGELU."""
    spec = _proto("full").backbone_for("anomalyclip")
    spec = dataclasses.replace(spec, arch=ARCH, pretrained=str(native_state), image_size=96)
    bb = load_backbone(spec)
    quick, plain = _quick_gelu_modules(bb.model)
    assert quick == 8 and plain == 0           # 4 visual + 4 text MLPs
    assert bb.activation == "quick_gelu" and "QuickGELU" in bb.describe()
    # without the protocol's statement a plain file is open_clip's GELU (nothing tells)
    bb = load_clip(ARCH, str(native_state), 96)
    assert _quick_gelu_modules(bb.model) == (0, 8) and bb.activation == "gelu"


def test_openai_weights_are_recognised(tmp_path: Path, native_state: Path):
    assert is_openai_weights("openai")
    assert not is_openai_weights("laion400m_e31") and not is_openai_weights(None)
    named = tmp_path / "timm--vit_large_patch14_clip_336.openai" / "open_clip_pytorch_model.bin"
    named.parent.mkdir()
    named.write_bytes(native_state.read_bytes())
    assert is_openai_weights(str(named))
    assert load_clip(ARCH, str(named), 64).activation == "quick_gelu"
    # OpenAI's own release format: a TorchScript archive (with metadata entries in its state)
    model = open_clip.create_model(ARCH, pretrained=None, force_quick_gelu=True)

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = model.visual
            self.transformer = model.transformer
            self.token_embedding = model.token_embedding
            self.positional_embedding = model.positional_embedding
            self.ln_final = model.ln_final
            self.text_projection = model.text_projection
            self.logit_scale = model.logit_scale
            self.register_buffer("input_resolution", torch.tensor(64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.visual.conv1(x)

    jit = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.trace(Holder(), torch.zeros(1, 3, 64, 64)), str(jit))
    assert any(n.endswith("constants.pkl") for n in zipfile.ZipFile(jit).namelist())
    assert is_openai_weights(str(jit))
    bb = load_clip(ARCH, str(jit), 64)
    assert bb.activation == "quick_gelu"
    ref = model.state_dict()
    got = bb.model.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_openai_tag_asks_open_clip_for_quick_gelu(monkeypatch):
    """The 'openai' tag route (no download here): load_clip passes force_quick_gelu=True."""
    calls = []
    real = open_clip.create_model

    def fake(arch, pretrained=None, **kw):
        calls.append((arch, pretrained, kw))
        return real("zsad-tiny", pretrained=None, **{k: v for k, v in kw.items() if k != "cache_dir"})

    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda arch: ["openai"])
    monkeypatch.setattr(open_clip, "create_model", fake)
    bb = load_clip(ARCH, "openai", 64)
    assert calls and calls[0][1] == "openai" and calls[0][2]["force_quick_gelu"] is True
    assert bb.activation == "quick_gelu"


def test_explicit_gelu_and_bad_values():
    assert load_clip(ARCH, None, 64, activation="gelu").activation == "gelu"
    with pytest.raises(BackboneError, match="activation must be one of"):
        load_clip(ARCH, None, 64, activation="relu")
    with pytest.raises(BackboneError, match="pos_embed_resize must be one of"):
        load_clip(ARCH, None, 64, pos_embed_resize="nearest")


# -- position-embedding resize ------------------------------------------------------------
def test_bilinear_resize_is_anomalyclips_forward_resize(native_state: Path):
    """AnomalyCLIP resizes the patch grid with F.interpolate(mode='bilinear') (no antialias)."""
    src = torch.load(native_state, weights_only=True)["visual.positional_embedding"]
    assert native_image_size(ARCH) == 64
    bb = load_clip(ARCH, str(native_state), 104, pos_embed_resize="bilinear")
    side, new = 8, 13
    grid = src[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, (new, new), mode="bilinear").reshape(1, -1, new * new).transpose(1, 2)[0]
    got = bb.model.visual.positional_embedding.detach()
    assert torch.equal(got[0], src[0]) and torch.allclose(got[1:], ref, atol=0, rtol=0)
    assert "pos-embed bilinear" in bb.describe() and bb.settings()["pos_embed_resize"] == "bilinear"


def test_bicubic_resize_is_adaclips_released_resize(native_state: Path):
    """AdaCLIP's released ``resize_pos_embed`` is bicubic *without* antialias
    (``method/clip_model.py``): not open_clip's antialiased bicubic, even when enlarging."""
    src = torch.load(native_state, weights_only=True)["visual.positional_embedding"]
    bb = load_clip(ARCH, str(native_state), 104, pos_embed_resize="bicubic")
    side, new = 8, 13
    grid = src[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(new * new, -1)
    got = bb.model.visual.positional_embedding.detach()
    assert torch.equal(got[0], src[0]) and torch.equal(got[1:], ref)
    oc = load_clip(ARCH, str(native_state), 104, pos_embed_resize="open_clip")
    assert not torch.allclose(got, oc.model.visual.positional_embedding.detach(), atol=1e-4)
    assert bb.settings()["pos_embed_resize"] == "bicubic"
    full = _proto("full")
    assert full.inputs_for("adaclip")["pos_embed_resize"] == "bicubic"


def test_open_clip_resize_is_open_clips_loader(native_state: Path):
    """'open_clip' mode is bit for bit open_clip.load_checkpoint at the forced size."""
    ref = open_clip.create_model(ARCH, pretrained=None, force_image_size=104)
    open_clip.load_checkpoint(ref, str(native_state))
    bb = load_clip(ARCH, str(native_state), 104, pos_embed_resize="open_clip")
    got, want = bb.model.state_dict(), ref.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    other = load_clip(ARCH, str(native_state), 104, pos_embed_resize="bilinear")
    assert not torch.equal(other.model.visual.positional_embedding,
                           bb.model.visual.positional_embedding)
    # at the native size nothing is resized and the setting does not split backbones
    a = load_clip(ARCH, str(native_state), 64, pos_embed_resize="bilinear")
    assert not a.pos_embed_resized and "pos-embed" not in a.describe()
    spec = protocol_mod.BackboneSpec(ARCH, "x.bin", 64)
    assert dataclasses.replace(spec, pos_embed_resize="bilinear").key() == spec.key()
    spec = dataclasses.replace(spec, image_size=104)
    assert dataclasses.replace(spec, pos_embed_resize="bilinear").key() != spec.key()


# -- protocols -----------------------------------------------------------------------------
def test_full_runs_each_method_as_released_and_full_uniform_one_configuration():
    full, uni = _proto("full"), _proto("full_uniform")
    assert full.inputs_for("anomalyclip")["pos_embed_resize"] == "bilinear"
    assert full.inputs_for("vand")["pos_embed_resize"] == "open_clip"
    assert full.class_words_for("vand") == "folder" and full.class_words_for("clip") == "readable"
    uniform = {m: uni.inputs_for(m) for m in uni.methods}
    assert len({tuple(sorted(v.items())) for v in uniform.values()}) == 1
    one = next(iter(uniform.values()))
    assert one["activation"] == "quick_gelu" and one["class_words"] == "readable"
    assert one["arch"] == "ViT-L-14-336" and one["image_size"] == 518
    assert full.digest() != uni.digest()


def test_protocol_switch_reproduces_a_released_bug(tmp_path: Path):
    text = (protocol_mod.PROTOCOL_DIR / "full.toml").read_text()
    text += '\n[backbones.vand]\nactivation = "gelu"\n'
    path = tmp_path / "vand_as_released.toml"
    path.write_text(text)
    proto = protocol_mod.load(path)
    spec = proto.backbone_for("vand")
    assert spec.arch == "ViT-L-14-336" and spec.image_size == 518   # arch inherited
    assert spec.activation == "gelu" and proto.backbone_for("clip").activation == "quick_gelu"
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('activation = "gelu"', 'activation = "swish"'))
    with pytest.raises(protocol_mod.ProtocolError, match=r"activation = 'swish'"):
        protocol_mod.load(bad)
    bad.write_text(text + '\n[class_words]\nvand = "verbatim"\n')
    with pytest.raises(protocol_mod.ProtocolError, match=r"\[class_words\] vand"):
        protocol_mod.load(bad)


def test_demo_protocol_is_untouched_by_the_input_settings():
    """The toy backbone is not OpenAI's and runs at its native size; words stay readable."""
    demo = _proto("demo")
    keys = {demo.backbone_for(m).key() for m in demo.methods}
    assert len(keys) == 1
    assert all(demo.class_words_for(m) == "readable" for m in demo.methods)
    spec = demo.backbone_for("anomalyclip")
    assert resolve_activation(spec.arch, "bench/demo/zsad-tiny-toy.pt", spec.activation) == "gelu"


def test_runner_feeds_folder_ids_to_vand(demo_data_root: Path, tmp_path: Path):
    from bench.runner import Runner

    text = (protocol_mod.PROTOCOL_DIR / "demo.toml").read_text().replace(
        'default = "readable"', 'default = "readable"\nvand = "folder"')
    path = tmp_path / "p.toml"
    path.write_text(text)
    proto = protocol_mod.validate(protocol_mod.load(path), methods=METHODS.names(),
                                  datasets=ADAPTERS.names())
    runner = Runner(proto, tmp_path / "res", demo_data_root, progress=False)
    target = runner.dataset("demo_target")
    rows = target.manifest[target.manifest["category"] == "coffee"].head(2)
    readable = target.torch_dataset(rows, 64, proto.class_words_for("clip"))[0]
    folder = target.torch_dataset(rows, 64, proto.class_words_for("vand"))[0]
    assert readable["prompt_name"] == "coffee cup" and folder["prompt_name"] == "coffee"
    inputs = runner.store.provenance()["inputs"]
    assert inputs["vand"]["class_words"] == "folder" and inputs["clip"]["class_words"] == "readable"


# -- feature cache --------------------------------------------------------------------------
def test_feature_cache_fp32_returns_the_uncached_features():
    bb = load_clip(ARCH, None, 64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ref = bb.encode_image_uncached(x, [2, 4])
    for dtype, exact in ((torch.float32, True), (torch.float16, False)):
        bb.feature_cache = FeatureCache("t", dtype=dtype)
        got = bb.encode_image(x, [2, 4])
        assert torch.equal(got.taps[4], ref.taps[4]) is exact
        assert torch.allclose(got.taps[4], ref.taps[4], atol=1e-2)
    bb.feature_cache = None
    assert FeatureCache("t").namespace != FeatureCache("t", dtype=torch.float32).namespace


# -- masks ------------------------------------------------------------------------------------
def _torchvision_anchor_mask(path: Path, size: int) -> torch.Tensor:
    """AnomalyCLIP/VAND: transforms.Resize((S, S)) on the PIL mask, ToTensor, > 0.5."""
    from torchvision import transforms

    t = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    with Image.open(path) as im:
        m = t(im.convert("L"))[0]
    return (m > 0.5).float()


def test_bilinear_mask_rule_is_the_anchors(tmp_path: Path):
    rng = np.random.default_rng(0)
    m = np.zeros((300, 420), np.uint8)
    for _ in range(6):  # blobs with ragged borders, like defect masks
        cy, cx, r = rng.integers(20, 280), rng.integers(20, 400), rng.integers(4, 40)
        yy, xx = np.ogrid[:300, :420]
        m[(yy - cy) ** 2 + (xx - cx) ** 2 * rng.uniform(0.3, 2) < r ** 2] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    for size in (64, 97, 518):
        ours = load_mask(tmp_path / "m.png", size)
        ref = _torchvision_anchor_mask(tmp_path / "m.png", size)
        assert torch.equal(ours, ref), size
        for rule in ("nearest", "bicubic"):
            other = load_mask(tmp_path / "m.png", size, resize=rule)
            assert 0 < (other != ours).sum() < 0.05 * size * size   # only at borders
    with pytest.raises(ValueError, match="mask_resize must be one of"):
        load_mask(tmp_path / "m.png", 64, resize="area")
