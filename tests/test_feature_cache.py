"""The frozen-feature cache: hits equal misses, fp16 rounding rule, disk reuse, integrity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.backbone import load_clip
from bench.feature_cache import FeatureCache, tensor_key


@pytest.fixture()
def bb():
    return load_clip("zsad-tiny", None, 64, seed=0)


def test_cached_features_are_the_fp16_rounding_of_the_forward_pass(bb):
    x = torch.randn(3, 3, 64, 64)
    ref = bb.encode_image(x, layers=[2, 4])
    bb.feature_cache = FeatureCache("t")
    miss = bb.encode_image(x, layers=[2, 4])
    hit = bb.encode_image(x, layers=[2, 4])
    assert bb.feature_cache.misses == 3 and bb.feature_cache.hits == 3
    for a, b, r in [(miss.global_embedding, hit.global_embedding, ref.global_embedding),
                    (miss.taps[2], hit.taps[2], ref.taps[2]), (miss.taps[4], hit.taps[4], ref.taps[4])]:
        assert torch.equal(a, b)
        assert torch.equal(a, r.half().float())


def test_partial_hits_and_new_layers(bb):
    bb.feature_cache = FeatureCache("t")
    x = torch.randn(4, 3, 64, 64)
    bb.encode_image(x[:2], layers=[4])
    out = bb.encode_image(x, layers=[4])  # two hits, two misses, order preserved
    assert bb.feature_cache.hits == 2 and bb.feature_cache.misses == 4
    ref = bb.encode_image_uncached(x, layers=[4])
    assert torch.equal(out.taps[4], ref.taps[4].half().float())
    out3 = bb.encode_image(x[:1], layers=[3])  # a layer not cached yet -> recomputed
    assert torch.equal(out3.taps[3], bb.encode_image_uncached(x[:1], [3]).taps[3].half().float())


def test_disk_cache_is_reused_by_a_new_process(bb, tmp_path: Path):
    x = torch.randn(2, 3, 64, 64)
    bb.feature_cache = FeatureCache("ns", directory=tmp_path)
    first = bb.encode_image(x, layers=[4])
    bb.feature_cache = FeatureCache("ns", directory=tmp_path)
    again = bb.encode_image(x, layers=[4])
    assert bb.feature_cache.hits == 2 and bb.feature_cache.misses == 0
    assert torch.equal(first.taps[4], again.taps[4])
    assert len(list(tmp_path.rglob("*.pt"))) == 2


def test_memory_budget_evicts(bb):
    bb.feature_cache = FeatureCache("t", max_bytes=1)
    x = torch.randn(2, 3, 64, 64)
    bb.encode_image(x, layers=[4])
    bb.encode_image(x, layers=[4])
    assert bb.feature_cache.hits == 0 and bb.feature_cache._bytes <= 1 + 65 * 128 * 2


def test_key_depends_on_content_only():
    a = torch.ones(3, 4, 4)
    assert tensor_key(a) == tensor_key(a.clone()) != tensor_key(a * 2)


def test_runner_refuses_a_method_that_edits_the_shared_backbone(tmp_path: Path, demo_data_root: Path):
    from bench.runner import RunError, Runner, expand, prepare_protocol
    from tests.conftest import write_protocol

    plugin = tmp_path / "vandal.py"
    plugin.write_text('''
import torch
from methods.base import Method, Prediction, register

@register("vandal")
class Vandal(Method):
    """Edits the shared backbone (must be refused)."""
    def predict(self, batch):
        with torch.no_grad():
            self.backbone.model.visual.proj.add_(1.0)
        b, s = batch["image"].shape[0], batch["image"].shape[-1]
        return Prediction(torch.zeros(b), torch.zeros(b, s, s))
''')
    proto = prepare_protocol(str(write_protocol(tmp_path / "p.toml", methods='["vandal"]')),
                             plugins=[str(plugin)])
    runner = Runner(proto, tmp_path / "R", demo_data_root, progress=False)
    with pytest.raises(RunError, match="vandal changed the weights of the shared backbone"):
        runner.run(expand(proto))
    assert not list((tmp_path / "R" / "units").glob("*.json"))
