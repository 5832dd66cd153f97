"""Profiling: clocks, memory, FLOPs, one inference-only and one trained method, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import profiling
from tests.conftest import write_protocol

IMAGE_SIZE = 32  # zsad-tiny (patch 8) at 32 px: a 4x4 grid keeps the 50 timed calls short


@pytest.fixture(scope="module")
def protocol_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_protocol(tmp_path_factory.mktemp("proto") / "p.toml")


@pytest.fixture(scope="module")
def records(protocol_file: Path) -> dict[str, dict]:
    recs = profiling.profile(["clip", "coop"], protocol=str(protocol_file), device="cpu",
                             image_size=IMAGE_SIZE, on_error="raise")
    return {r["method"]: r for r in recs}


def test_time_calls_counts_and_percentile() -> None:
    calls, cpu = [], []
    times = profiling.time_calls(lambda: calls.append(1), "cpu", warmup=10, iters=50, cpu_times=cpu)
    assert len(calls) == 60 and len(times) == len(cpu) == 50 and all(t >= 0 for t in times)
    assert profiling.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    with pytest.raises(ValueError, match="warmup"):
        profiling.profile_method("clip", None, warmup=1, iters=50)


def test_cpu_peak_memory_sees_allocations() -> None:
    def fn() -> None:
        a = torch.ones(2 * 1024 * 1024)  # 8 MiB
        b = a * 2                        # +8 MiB alive at once
        del a, b

    peak, extra, how = profiling.peak_memory(fn, "cpu", resident=3 * profiling.MIB)
    assert 16 <= extra < 64, extra
    assert peak == pytest.approx(extra + 3)
    assert "profile_memory" in how


def test_flops_of_a_linear_layer() -> None:
    lin = torch.nn.Linear(10, 20, bias=False)
    x = torch.randn(1, 10)
    assert profiling.count_flops(lambda: lin(x)) == 2 * 10 * 20


def test_flops_of_a_vit_match_the_analytic_count() -> None:
    """zsad-tiny's visual tower at 32 px: every matmul, the attention and the patch conv.

    Checks that the attention projections (hidden in nn.MultiheadAttention's fused
    inference path) and the CPU attention kernel are counted.
    """
    from bench.backbone import load_clip

    bb = load_clip("zsad-tiny", None, image_size=32, seed=0)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        flops = profiling.count_flops(lambda: bb.model.encode_image(x))
    layers, tokens, width, patch, embed = 4, 17, 128, 8, 64
    macs = (layers * (12 * tokens * width**2 + 2 * tokens**2 * width)
            + (tokens - 1) * 3 * patch**2 * width + width * embed)
    assert flops == 2 * macs
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_records_of_a_training_free_and_a_trained_method(records: dict[str, dict]) -> None:
    clip, coop = records["clip"], records["coop"]
    for r in (clip, coop):
        assert r["warmup"] >= 10 and r["iters"] >= 50 and r["batch_size"] == 1
        assert 0 < r["latency_min_ms"] <= r["latency_median_ms"] <= r["latency_p90_ms"]
        assert r["cpu_time_median_ms"] > 0
        assert r["fps"] == pytest.approx(1000 / r["latency_median_ms"])
        assert r["infer_peak_mib"] > 0 and r["gflops"] > 0 and r["one_off_s"] >= 0
        assert r["total_params"] > r["learnable_params"] >= 0
        assert r["device_type"] == "cpu" and r["device"].startswith("CPU")
        assert r["image_size"] == IMAGE_SIZE and r["weights"]
    assert clip["learnable_params"] == 0 and clip["train_peak_mib"] is None
    assert coop["learnable_params"] > 0
    assert coop["train_peak_mib"] > coop["train_extra_mib"] > 0
    assert coop["train_batch_size"] == 8


def test_flops_scale_with_image_size(records: dict[str, dict], protocol_file: Path) -> None:
    # the visual tower dominates: 4x the pixels -> clearly more FLOPs
    bb, _ = profiling.load_backbone(profiling_spec(protocol_file), "cpu", 2 * IMAGE_SIZE)
    from bench.registry import create_method

    m = create_method("clip", bb)
    batch = profiling.make_batch(bb.image_size, 1)
    with torch.no_grad():
        m.predict(batch)  # text features once
        big = profiling.count_flops(lambda: m.predict(batch))
    assert big / 1e9 > 2 * records["clip"]["gflops"]


def profiling_spec(protocol_file: Path):
    from bench import protocol

    return protocol.load(protocol_file).backbone


def test_toy_weights_fall_back_to_random(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from bench.protocol import TOY_PRETRAINED, BackboneSpec

    monkeypatch.setitem(sys.modules, "bench.demo.toyclip", None)  # import fails
    bb, note = profiling.load_backbone(BackboneSpec("zsad-tiny", TOY_PRETRAINED, IMAGE_SIZE), "cpu")
    assert bb.pretrained is None and "random weights" in note


def test_cli_appends_to_the_result_store_and_report_shows_it(protocol_file: Path,
                                                             tmp_path: Path, capsys) -> None:
    from bench.cli import main
    from bench.report import render
    from tests.report_data import make_store

    run = make_store(tmp_path / "run", with_cost=False)
    rc = main(["profile", "--methods", "clip", "--protocol", str(protocol_file),
               "--image-size", str(IMAGE_SIZE), "--results", str(run)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "only the ratios between methods" in out and "clip" in out
    lines = (run / "cost.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    assert rec["method"] == "clip" and rec["device"].startswith("CPU")
    index = render(run, tmp_path / "site")
    text = index.read_text()
    assert 'id="tbl-cost"' in text and "only the ratios between methods" in text


def test_unknown_method_is_an_error(protocol_file: Path, capsys) -> None:
    from bench.cli import main

    rc = main(["profile", "--methods", "nope", "--protocol", str(protocol_file)])
    assert rc == 2 and "unknown method" in capsys.readouterr().err
