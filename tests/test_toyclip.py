"""The toy CLIP: corpus, tokens, checkpoint IO and the shipped checkpoint's signal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.backbone import load_clip
from bench.demo import toyclip
from dataset_adapters import demo


def test_corpus_is_deterministic():
    a = toyclip.build_corpus(3, 24)
    b = toyclip.build_corpus(3, 24)
    c = toyclip.build_corpus(4, 24)
    assert toyclip.corpus_digest(a) == toyclip.corpus_digest(b)
    assert toyclip.corpus_digest(a) != toyclip.corpus_digest(c)
    assert a.clean.shape == (24, 64, 64, 3) and a.mask.shape == (24, 64, 64)
    assert all(a.mask[i].any() for i in range(len(a)))
    changed = (a.clean != a.defective).any(-1)
    assert not (changed & ~a.mask).any()


def test_corpus_never_uses_demo_target_sources(monkeypatch):
    held_out = set(demo.TARGET_SOURCES.values())
    for name in list(held_out):
        held_out |= set(demo.SOURCE_ALIASES.get(name, ()))
    assert held_out <= set(toyclip.HELD_OUT_SOURCES)
    assert not held_out & set(toyclip.CORPUS_SOURCES)
    # and the generator really never calls them
    import skimage.data

    def forbidden(*args, **kwargs):
        raise AssertionError("the corpus read a demo_target source")

    for name in held_out:
        monkeypatch.setattr(skimage.data, name, forbidden)
    corpus = toyclip.build_corpus(0, 40, photo_fraction=1.0)
    assert len(corpus) == 40
    with pytest.raises(ValueError):
        toyclip._load_skimage("chelsea")


def test_prompt_pieces_match_the_tokenizer():
    vocab = toyclip._Vocab()
    tok = toyclip.tokenizer()
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, a = toyclip._prompt_pair(rng, vocab, "red brick wall", [5000], 0.0)
        for ids in (n, a):
            ids = [i for i in ids if i]
            text = vocab._bpe.decode(ids[1:-1])
            assert ids == [i for i in tok([text])[0].tolist() if i]
    caption = "a photo of a scratched grey gravel with a scratch."
    assert toyclip._pad(vocab.encode(caption)) == tok([caption])[0].tolist()


def test_compact_text_tower_matches_backbone():
    bb = toyclip._new_model(0)
    vocab = toyclip._Vocab()
    text = toyclip._CompactText(bb.model, toyclip.known_token_ids(vocab), torch.Generator().manual_seed(0))
    text.export()
    prompts = ["a photo of a damaged coffee cup.", "a photo of a flawless brick wall."]
    ids = torch.tensor([toyclip._pad(vocab.encode(p)) for p in prompts])
    with torch.no_grad():
        ours = torch.nn.functional.normalize(text(ids), dim=-1)
    ref = bb.encode_text(prompts)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_recipes_name_the_default_and_the_previous_settings():
    # issue 15: the default (shipped) recipe trains the patches against free vectors only;
    # the previous recipe stays reproducible by name
    assert toyclip.TrainConfig() == toyclip.TrainConfig.recipe("free-patches")
    default = toyclip.TrainConfig()
    assert (default.w_patch, default.w_pool, default.w_patch_free) == (0.0, 0.0, 1.0)
    aligned = toyclip.TrainConfig.recipe("aligned-patches")
    assert (aligned.w_patch, aligned.w_pool, aligned.w_patch_free) == (1.0, 2.0, 0.0)
    assert toyclip.TrainConfig.recipe("aligned-patches", steps=3).steps == 3
    assert set(toyclip.RECIPE_SHA256) == set(toyclip.RECIPES)
    assert toyclip.CHECKPOINT_SHA256 == toyclip.RECIPE_SHA256["free-patches"]
    assert len(set(toyclip.RECIPE_SHA256.values())) == len(toyclip.RECIPES)
    with pytest.raises(ValueError, match="aligned-patches"):
        toyclip.TrainConfig.recipe("aligned")


def test_tiny_training_is_bit_reproducible(tmp_path):
    cfg = toyclip.TrainConfig(corpus_size=8, steps=2, batch_pairs=4, warmup=1)
    shas = []
    for k in range(2):
        bb = toyclip.train(cfg, log=lambda s: None, progress=False)
        shas.append(toyclip.save_checkpoint(toyclip.state_dict_fp16(bb.model), tmp_path / f"{k}.pt"))
    assert shas[0] == shas[1]
    loaded = load_clip(toyclip.ARCH, pretrained=str(tmp_path / "0.pt"), image_size=64)
    ref = toyclip.state_dict_fp16(bb.model)
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value.half(), ref[key])


@pytest.fixture(scope="module")
def toy():
    try:
        path = toyclip.checkpoint_path(build=False)
    except FileNotFoundError:
        pytest.skip("no toy checkpoint shipped or cached")
    return load_clip(toyclip.ARCH, pretrained=str(path), image_size=64)


def test_shipped_checkpoint_hash():
    path = toyclip.SHIPPED_CHECKPOINT
    if not path.is_file():
        pytest.skip("no shipped checkpoint")
    assert toyclip.file_sha256(path) == toyclip.CHECKPOINT_SHA256


def test_unknown_words_have_zero_embeddings(toy):
    known = set(toyclip.known_token_ids())
    w = toy.model.token_embedding.weight
    unknown = torch.tensor([i for i in range(w.shape[0]) if i not in known])
    assert torch.count_nonzero(w[unknown]) == 0
    assert torch.count_nonzero(w[torch.tensor(sorted(known))]) > 0


def test_toy_checkpoint_detects_damage_on_held_out_generated_set(toy):
    corpus = toyclip.build_corpus(987654, 48)  # a seed the shipped model never trained on
    images = toyclip.to_tensor(np.concatenate([corpus.clean, corpus.defective]))
    scores, maps = toyclip.zero_shot(toy, images, "object")  # the acceptance prompt ensemble
    clean, damaged = scores[:48], scores[48:]
    # a damaged image scores higher than its clean twin more often than chance
    wins = (damaged > clean).float().mean().item()
    assert wins > 0.65, wins
    # and its defect pixels more than the rest of the image
    m = torch.from_numpy(corpus.mask)
    inside = maps[48:][m].mean()
    outside = maps[48:][~m].mean()
    assert inside > outside


def test_zero_shot_is_what_the_clip_method_sees(toy):
    prompts = pytest.importorskip("methods.prompts")
    from bench.registry import create_method

    assert toyclip.PAIR_PROMPTS == (tuple(prompts.CLIP_NORMAL_PROMPTS),
                                    tuple(prompts.CLIP_ANOMALOUS_PROMPTS))
    method = create_method("clip", toy)
    corpus = toyclip.build_corpus(5, 4)
    images = toyclip.to_tensor(corpus.defective)
    pred = method.predict({"image": images, "prompt_name": ["coffee cup"] * 4})
    scores, maps = toyclip.zero_shot(toy, images, "coffee cup", toyclip.PAIR_PROMPTS)
    torch.testing.assert_close(pred.image_scores, scores, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred.anomaly_maps, maps, atol=1e-4, rtol=1e-4)
