"""Backbone loading (tiny model, checkpoints, errors), preprocessing, manifests, check_method."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image

from bench import manifest as mf
from bench.backbone import OPENAI_MEAN, OPENAI_STD, BackboneError, load_clip
from bench.data import DecodedCache, ManifestDataset, collate, load_image, load_mask, make_loader
from bench.registry import METHODS
from methods.base import check_method


def test_tiny_backbone_matches_open_clip(tiny_backbone):
    x = torch.randn(2, 3, 64, 64)
    feats = tiny_backbone.encode_image(x, layers=[2, 4])
    assert set(feats.taps) == {2, 4} and feats.grid == (8, 8)
    assert feats.taps[4].shape == (2, 65, tiny_backbone.width)
    ref = tiny_backbone.model.encode_image(x)
    assert torch.allclose(feats.global_embedding, ref, atol=1e-5)
    texts = ["a photo of a damaged bottle", "a flawless grid"]
    ref_t = tiny_backbone.model.encode_text(tiny_backbone.tokenize(texts), normalize=True)
    assert torch.allclose(tiny_backbone.encode_text(texts), ref_t, atol=1e-5)
    assert not any(p.requires_grad for p in tiny_backbone.parameters())


def test_random_init_is_seeded():
    a, b = load_clip("zsad-tiny", None, 64, seed=1), load_clip("zsad-tiny", None, 64, seed=1)
    c = load_clip("zsad-tiny", None, 64, seed=2)
    assert torch.equal(a.model.visual.proj, b.model.visual.proj)
    assert not torch.equal(a.model.visual.proj, c.model.visual.proj)


def test_checkpoint_round_trip_and_position_interpolation(tmp_path: Path, tiny_backbone):
    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_backbone.model.state_dict(), ckpt)
    same = load_clip("zsad-tiny", ckpt, 64)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(same.encode_image(x).global_embedding, tiny_backbone.encode_image(x).global_embedding)
    big = load_clip("zsad-tiny", str(ckpt), 96)  # interpolated to a 12x12 grid
    assert big.grid_size == 12 and big.model.visual.positional_embedding.shape[0] == 145
    assert torch.equal(big.model.visual.positional_embedding[0], tiny_backbone.model.visual.positional_embedding[0])
    with pytest.raises(BackboneError, match="feed images of 96px"):
        big.encode_image(x)


def test_half_precision_checkpoint_interpolates_like_fp32(tmp_path: Path, tiny_backbone):
    # CPU bicubic interpolation has no fp16 kernel: the loader upcasts before resizing.
    state = tiny_backbone.model.state_dict()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "h.pt")
    torch.save({k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "f.pt")
    half, full = load_clip("zsad-tiny", tmp_path / "h.pt", 96), load_clip("zsad-tiny", tmp_path / "f.pt", 96)
    assert half.grid_size == 12
    assert torch.equal(half.model.visual.positional_embedding, full.model.visual.positional_embedding)


def test_missing_checkpoint_says_where_to_put_it(tmp_path: Path):
    with pytest.raises(BackboneError, match=r"checkpoint not found: .*nope\.pt\. Put the zsad-tiny weights there"):
        load_clip("zsad-tiny", tmp_path / "nope.pt")
    with pytest.raises(BackboneError, match=r"hf-hub timm/vit_large_patch14_clip_336.openai"):
        load_clip("ViT-L-14-336", tmp_path / "ViT-L-14-336.bin")


def test_wrong_checkpoint_and_unknown_names(tmp_path: Path):
    bad = tmp_path / "bad.pt"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(BackboneError, match="not a usable zsad-tiny checkpoint"):
        load_clip("zsad-tiny", bad)
    with pytest.raises(BackboneError, match="unknown architecture"):
        load_clip("ViT-Nope")
    with pytest.raises(BackboneError, match="neither a checkpoint file nor an open_clip tag"):
        load_clip("zsad-tiny", "laion-nonexistent")
    with pytest.raises(BackboneError, match="cannot tap"):
        load_clip("zsad-tiny", None, 64).encode_image(torch.zeros(1, 3, 64, 64), layers=[9])


def test_deep_prompts_change_text_features(tiny_backbone):
    tokens = tiny_backbone.tokenize(["x x x x object"])
    emb = tiny_backbone.token_embedding(tokens)
    base = tiny_backbone.encode_text_embeddings(emb, tokens)
    deep = [torch.randn(2, tiny_backbone.text_width) for _ in range(2)]
    out = tiny_backbone.encode_text_embeddings(emb, tokens, deep_prompts=deep)
    assert out.shape == base.shape and not torch.allclose(out, base)
    assert open_clip.tokenize(["x"]).shape[1] == tiny_backbone.context_length


# -- preprocessing ----------------------------------------------------------------------

def test_load_image_bicubic_and_clip_normalisation(tmp_path: Path):
    arr = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    t = load_image(tmp_path / "a.png", 16)
    ref = np.asarray(Image.fromarray(arr).resize((16, 16), Image.Resampling.BICUBIC), np.float32) / 255
    ref = (ref - np.array(OPENAI_MEAN, np.float32)) / np.array(OPENAI_STD, np.float32)
    assert t.shape == (3, 16, 16)
    assert np.allclose(t.permute(1, 2, 0).numpy(), ref, atol=1e-6)


def test_load_mask_threshold_then_nearest(tmp_path: Path):
    m = np.zeros((8, 8), np.uint8)
    m[:4, :4] = 255
    m[4:, 4:] = 3  # VisA-style small label value
    Image.fromarray(m).save(tmp_path / "m.png")
    strict = load_mask(tmp_path / "m.png", 4)  # default threshold 128
    assert strict.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    anynz = load_mask(tmp_path / "m.png", 4, threshold=1)
    assert anynz.sum() == 8 and set(anynz.unique().tolist()) == {0.0, 1.0}


def test_unreadable_image_names_the_file(tmp_path: Path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    from bench.data import DataError

    with pytest.raises(DataError, match=r"broken\.png: cannot read image"):
        load_image(tmp_path / "broken.png", 8)


def test_dataset_and_seeded_loader(demo_data_root: Path):
    from bench.registry import get_adapter

    df = get_adapter("demo_aux").scan(demo_data_root / "demo_aux")
    ds = ManifestDataset(df, demo_data_root / "demo_aux", 32)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (32, 32)
    order = [b["index"].tolist() for b in make_loader(ds, batch_size=8, shuffle=True, seed=3)]
    again = [b["index"].tolist() for b in make_loader(ds, batch_size=8, shuffle=True, seed=3)]
    other = [b["index"].tolist() for b in make_loader(ds, batch_size=8, shuffle=True, seed=4)]
    assert order == again != other
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 32, 32) and isinstance(batch["category"], list)
    anomalous = df.index[df["label"] == 1][0]
    assert ds[int(anomalous)]["mask"].sum() > 0


def test_decoded_cache_gives_a_fresh_decodes_tensors_and_decodes_once(demo_data_root: Path):
    from bench.registry import get_adapter

    df = get_adapter("demo_aux").scan(demo_data_root / "demo_aux")
    root = demo_data_root / "demo_aux"
    plain = ManifestDataset(df, root, 32)
    cache = DecodedCache(1 << 30)
    cached = ManifestDataset(df, root, 32, cache=cache)
    n_masks = int((df["mask"].fillna("") != "").sum())
    for epoch in range(2):
        for a, b in zip(make_loader(plain, batch_size=8, shuffle=True, seed=epoch),
                        make_loader(cached, batch_size=8, shuffle=True, seed=epoch), strict=True):
            assert a["path"] == b["path"]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    # every image and mask decoded once, read from the cache in the second epoch
    assert cache.misses == len(df) + n_masks and cache.hits == len(df) + n_masks
    # what a caller gets is its own copy: writing into it changes no later read
    item = cached[0]
    item["image"].zero_()
    assert torch.equal(cached[0]["image"], plain[0]["image"])
    # another preprocessing of the same file is another entry
    assert ManifestDataset(df, root, 16, cache=cache)[0]["image"].shape == (3, 16, 16)


def test_decoded_cache_budget_and_changed_files(tmp_path: Path):
    def write(name: str, value: int) -> None:
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / name)

    for i, name in enumerate(["a.bmp", "b.bmp", "c.bmp"]):  # BMP: a rewrite keeps the size
        write(name, 40 * i)
    rows = pd.DataFrame({"image": ["a.bmp", "b.bmp", "c.bmp"], "mask": [""] * 3, "label": [0] * 3,
                         "category": ["c"] * 3, "dataset": ["d"] * 3, "domain": ["industrial"] * 3})
    one = 3 * 8 * 8 * 4  # bytes of one decoded float32 image
    cache = DecodedCache(2 * one)
    ds = ManifestDataset(rows, tmp_path, 8, cache=cache)
    for i in (0, 1, 2):  # the third evicts the least recently used (a)
        ds[i]
    assert len(cache) == 2 and cache.nbytes == 2 * one and cache.misses == 3
    ds[2], ds[1]
    assert cache.hits == 2
    ds[0]
    assert cache.misses == 4  # a was evicted, decoded again
    # a file rewritten on disk is decoded again, not served stale
    write("a.bmp", 200)
    st = (tmp_path / "a.bmp").stat()
    os.utime(tmp_path / "a.bmp", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert torch.equal(ds[0]["image"], load_image(tmp_path / "a.bmp", 8))
    assert cache.misses == 5
    # a budget of 0 keeps nothing; a missing file still raises the error that names it
    empty = DecodedCache(0)
    ManifestDataset(rows, tmp_path, 8, cache=empty)[0]
    assert len(empty) == 0 and empty.nbytes == 0
    from bench.data import DataError

    missing = rows.assign(image=["gone.png", "b.bmp", "c.bmp"])
    with pytest.raises(DataError, match=r"gone\.png: cannot read image"):
        ManifestDataset(missing, tmp_path, 8, cache=cache)[0]


def _epochs(loader, n_epochs: int, wrap=lambda it: it, stop_after: int | None = None):
    out = []
    for _ in range(n_epochs):
        epoch = []
        for i, batch in enumerate(wrap(loader)):
            epoch.append(batch[0].tolist() if isinstance(batch, list) else batch["index"].tolist())
            if stop_after is not None and i + 1 == stop_after:
                break
        out.append(epoch)
    return out


def test_training_order_is_torchs_plain_iteration_whatever_wraps_the_loader():
    """Issue 16: the order must not depend on how the loader is iterated.

    Reference: torch's own ``DataLoader(shuffle=True, generator=manual_seed(seed))``
    iterated plainly. ``tqdm.auto`` (the runner's progress bar) calls ``iter()`` one extra
    time, which shifted every permutation of torch's loader; the runner's DeviceLoader does
    not — so the order once depended on the progress bar.
    """
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm.auto import tqdm

    from bench.data import DeviceLoader

    class Indexed(TensorDataset):
        def __getitem__(self, i):
            return {"index": i}

    ds = Indexed(torch.arange(37))
    g = torch.Generator().manual_seed(5)
    reference = _epochs(DataLoader(ds, batch_size=8, shuffle=True, generator=g,
                                   collate_fn=collate), 3)
    g = torch.Generator().manual_seed(5)
    torch_with_bar = _epochs(DataLoader(ds, batch_size=8, shuffle=True, generator=g,
                                        collate_fn=collate), 3, lambda it: tqdm(it, disable=True))
    assert torch_with_bar != reference  # the trap: torch's loader under tqdm.auto reorders

    def ours():
        return make_loader(ds, batch_size=8, shuffle=True, seed=5)

    assert _epochs(ours(), 3) == reference
    assert _epochs(ours(), 3, lambda it: tqdm(it, disable=True)) == reference
    assert _epochs(DeviceLoader(ours(), "cpu"), 3) == reference
    loader = ours()
    for _ in range(4):  # iterators made and dropped unused draw nothing
        iter(loader)
    assert _epochs(loader, 3) == reference
    # an epoch stopped early does not shift the next epoch's permutation
    partial = _epochs(ours(), 3, stop_after=2)
    assert [e[:2] for e in reference] == partial
    shortened = ours()
    _epochs(shortened, 1, stop_after=1)
    assert _epochs(shortened, 2) == reference[1:]
    assert sorted(sum(reference[0], [])) == list(range(37))


# -- manifests ------------------------------------------------------------------------

def _row(**kw):
    base = dict(dataset="x", domain="industrial", modality="RGB", category="a", split="test",
                image="a/0.png", mask=None, label=0, defect="good", width=8, height=8)
    return {**base, **kw}


def test_manifest_write_read_round_trip(tmp_path: Path):
    df = mf.from_rows([_row(), _row(image="a/1.png", mask="a/1_mask.png", label=1, defect="hole")])
    path = mf.write(df, mf.manifest_path(tmp_path, "x"))
    back = mf.read(path)
    pd.testing.assert_frame_equal(back, df)
    assert back["mask"].isna().tolist() == [True, False]


def test_manifest_validation_names_files_and_fixes(tmp_path: Path):
    df = mf.from_rows([_row(), _row(image="a/1.png", label=1, defect="hole"), _row(category="zz", image="z.png")])
    problems = mf.validate(df, tmp_path, has_masks=True, categories=["a"])
    text = "\n".join(map(str, problems))
    assert "a/1.png: anomalous image without a mask" in text
    assert "unknown categories ['zz']" in text
    assert "a/0.png: image file not found" in text.replace(str(tmp_path) + "/", "")
    with pytest.raises(mf.ManifestError, match="manifest not found .* `zsad-bench prepare x --root"):
        mf.read(tmp_path / "x.manifest.parquet")


# -- every registered method honours the plugin contract ---------------------------------

@pytest.mark.parametrize("name", METHODS.names())
def test_check_method(name: str, tiny_backbone):
    check_method(METHODS.get(name), tiny_backbone, epochs=1)


def test_check_method_catches_a_broken_method(tiny_backbone):
    from methods.base import Method, Prediction

    class Broken(Method):
        name = "broken"

        def predict(self, batch):
            b = batch["image"].shape[0]
            return Prediction(torch.rand(b), torch.rand(b, 8, 8))  # wrong map size, not seeded

    with pytest.raises(AssertionError, match="anomaly_maps shape"):
        check_method(Broken, tiny_backbone)
