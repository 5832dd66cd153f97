"""Auxiliary splits made of several datasets (AdaCLIP's protocol: MVTec AD + ColonDB, ...)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import manifest as mf
from bench import protocol as protocol_mod
from bench import results
from bench.registry import load_plugin
from bench.runner import Runner, expand, prepare_protocol
from tests.conftest import REPO, write_protocol

HELDOUT = REPO / "examples" / "heldout_aux.py"

COUNTING_PLUGIN = '''
import torch
from methods.base import Method, Prediction, register

SEEN = []

@register("aux_counter")
class AuxCounter(Method):
    """Counts what fit sees (test plugin)."""
    trains = True
    default_hparams = {"epochs": 1}

    def __init__(self, backbone, **hp):
        super().__init__(backbone, **hp)
        self.head = torch.nn.Linear(1, 1)

    def fit(self, aux_loader, *, epochs=None, seed=0, progress=iter):
        seen = {}
        for batch in aux_loader:
            for d, p in zip(batch["dataset"], batch["path"]):
                seen.setdefault(d, set()).add(p)
        SEEN.append({"n": len(aux_loader.dataset), "paths": seen})

    def predict(self, batch):
        b, s = batch["image"].shape[0], batch["image"].shape[-1]
        return Prediction(torch.zeros(b), torch.zeros(b, s, s))
'''


@pytest.fixture()
def data_copy(demo_data_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(demo_data_root, dst)
    return dst


def _test_images(root: Path, name: str) -> set[str]:
    man = mf.read(mf.manifest_path(root / name, name))
    return set(man[man["split"] == "test"]["image"])


def test_multi_dataset_aux_trains_on_the_union(tmp_path: Path, data_copy: Path):
    load_plugin(HELDOUT)
    plugin = tmp_path / "aux_counter.py"
    plugin.write_text(COUNTING_PLUGIN)
    load_plugin(plugin)
    import sys

    mod = next(m for n, m in sys.modules.items() if n.startswith("zsad_plugin_aux_counter"))
    path = write_protocol(tmp_path / "p.toml", methods='["aux_counter"]', seeds="[0]",
                          aux="demo_aux", extra="[transfers.hparams.aux_counter]\nepochs = 1\n")
    text = path.read_text().replace('aux = "demo_aux"', 'aux = ["demo_aux", "demo_aux_heldout"]')
    path.write_text(text)
    proto = prepare_protocol(str(path))
    assert proto.transfers[0].aux == "demo_aux+demo_aux_heldout"
    assert proto.transfers[0].aux_datasets == ("demo_aux", "demo_aux_heldout")
    assert proto.hparams_for("aux_counter", "demo_aux+demo_aux_heldout") == {"epochs": 1}
    assert {"demo_aux", "demo_aux_heldout", "demo_target"} <= set(proto.all_datasets())
    jobs = expand(proto)
    assert [j.aux for j in jobs] == ["demo_aux+demo_aux_heldout"]
    Runner(proto, tmp_path / "R", data_copy, progress=False).run(jobs)
    aux_imgs = _test_images(data_copy, "demo_aux")
    held_imgs = _test_images(data_copy, "demo_aux_heldout")
    assert len(mod.SEEN) == 1
    seen = mod.SEEN[0]
    assert seen["n"] == len(aux_imgs) + len(held_imgs)
    assert seen["paths"]["demo_aux"] == aux_imgs
    assert seen["paths"]["demo_aux_heldout"] == held_imgs
    df = results.load(tmp_path / "R")
    assert set(df["aux"]) == {"demo_aux+demo_aux_heldout"} and set(df["dataset"]) == {"demo_target"}


def test_target_inside_its_aux_is_refused(tmp_path: Path):
    path = write_protocol(tmp_path / "p.toml", targets='["demo_target", "demo_aux"]')
    path.write_text(path.read_text().replace('aux = "demo_aux"', 'aux = ["demo_target", "demo_aux"]'))
    with pytest.raises(protocol_mod.ProtocolError,
                       match=r"aux=.demo_target\+demo_aux. also lists .demo_target., .demo_aux.*never evaluates"):
        protocol_mod.load(path)
    path.write_text(path.read_text().replace('aux = ["demo_target", "demo_aux"]',
                                             'aux = ["demo_aux", "demo_aux"]'))
    with pytest.raises(protocol_mod.ProtocolError, match="list of distinct dataset ids"):
        protocol_mod.load(path)
