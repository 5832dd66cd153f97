"""Registry (discovery, duplicates, plugins) and protocol validation."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench import protocol
from bench.registry import ADAPTERS, METHODS, Registry, RegistryError, create_method, load_plugin
from tests.conftest import EXAMPLE_PLUGIN, PY, REPO, cli_env, write_protocol


def test_discovery_finds_builtin_methods_and_demo_adapters():
    assert "clip" in METHODS.names()
    assert {"demo_aux", "demo_target"} <= set(ADAPTERS.names())


def test_duplicate_name_error_names_both_places():
    reg: Registry[type] = Registry("method", "methods", "zsad_bench.test_none")

    class A:
        pass

    class B:
        pass

    reg.add("x", A)
    reg.add("x", A)  # the same object again (re-import) is fine
    with pytest.raises(RegistryError) as err:
        reg.add("x", B)
    msg = str(err.value)
    assert "registered twice" in msg and "A" in msg and "B" in msg
    assert msg.count("test_registry_protocol.py") == 2


def test_plugin_registering_a_taken_name_is_an_error(tmp_path: Path):
    f = tmp_path / "dup.py"
    f.write_text("from methods.base import Method, register\n\n"
                 "@register('clip')\nclass Other(Method):\n    '''dup'''\n")
    with pytest.raises(RegistryError, match=r"'clip' is registered twice: first at .*methods/clip.py"):
        load_plugin(f)


@pytest.mark.parametrize("content,match", [
    ("def broken(:\n", "failed to import: SyntaxError"),
    ("x = 1\n", "registered nothing"),
    ("raise RuntimeError('boom')\n", "RuntimeError: boom"),
])
def test_bad_plugin_file_gives_clear_error(tmp_path: Path, content: str, match: str):
    f = tmp_path / "bad_plugin.py"
    f.write_text(content)
    with pytest.raises(RegistryError, match=match) as err:
        load_plugin(f)
    assert str(f) in str(err.value)


def test_plugin_path_must_be_a_python_file(tmp_path: Path):
    with pytest.raises(RegistryError, match="not a Python file"):
        load_plugin(tmp_path / "missing.py")


def test_example_plugin_registers_and_creates(tiny_backbone):
    names = load_plugin(EXAMPLE_PLUGIN)
    assert names in (["patch_probe"], [])  # [] if another test loaded it already
    m = create_method("patch_probe", tiny_backbone)
    assert m.trains and m.learnable_parameters() == tiny_backbone.embed_dim + 1


def test_unknown_method_lists_known():
    with pytest.raises(RegistryError, match="unknown method 'nope'. Known: .*clip"):
        METHODS.get("nope")


def test_cli_list_methods_prints_name_first():
    out = subprocess.run([PY, "-m", "bench", "list", "methods"], capture_output=True, text=True,
                         env=cli_env(), cwd=REPO, check=True).stdout
    lines = out.strip().splitlines()
    builtin = [n for n, c in METHODS.items() if c.__module__.startswith("methods.")]
    assert [ln.split()[0] for ln in lines] == builtin
    assert all(len(ln.split()) >= 3 for ln in lines)  # name, kind, description


def test_cli_bad_plugin_exits_2(tmp_path: Path):
    f = tmp_path / "bad.py"
    f.write_text("import not_a_module_xyz\n")
    r = subprocess.run([PY, "-m", "bench", "--plugin", str(f), "list", "methods"],
                       capture_output=True, text=True, env=cli_env(), cwd=REPO)
    assert r.returncode == 2 and str(f) in r.stderr and "not_a_module_xyz" in r.stderr


# -- protocols ------------------------------------------------------------------------

def test_builtin_protocols_load_and_cover_the_design():
    full = protocol.load("full")
    assert full.backbone.arch == "ViT-L-14-336" and full.backbone.image_size == 518
    assert full.seeds == [0, 1, 2, 3, 4]
    pairs = {t.aux: set(t.targets) for t in full.transfers}
    assert pairs["visa"] == {"mvtec"}
    assert len(pairs["mvtec"]) == 14 and "mvtec" not in pairs["mvtec"]
    demo = protocol.load("demo")
    assert [(t.aux, t.targets) for t in demo.transfers] == [("demo_aux", ("demo_target",))]


def test_leakage_is_refused(tmp_path: Path):
    p = write_protocol(tmp_path / "leak.toml", targets='["demo_target", "demo_aux"]')
    with pytest.raises(protocol.ProtocolError, match="never evaluates on the auxiliary"):
        protocol.load(p)


def test_unknown_method_and_dataset_are_refused(tmp_path: Path):
    p = protocol.load(write_protocol(tmp_path / "a.toml", methods='["clip", "nope"]'))
    with pytest.raises(protocol.ProtocolError, match=r"unknown methods \['nope'\]"):
        protocol.validate(p, methods=METHODS.names(), datasets=ADAPTERS.names())
    p = protocol.load(write_protocol(tmp_path / "b.toml", targets='["mars_rocks"]'))
    with pytest.raises(protocol.ProtocolError, match=r"unknown datasets \['mars_rocks'\]"):
        protocol.validate(p, methods=METHODS.names(), datasets=ADAPTERS.names())


@pytest.mark.parametrize("body,match", [
    ("seeds = [0, 0]\n[backbone]\narch='zsad-tiny'\n[[transfers]]\naux='a'\ntargets=['b']\n",
     "distinct"),
    ("nonsense = 1\n", "unknown top-level keys"),
    ("[backbone]\narch='zsad-tiny'\n", r"missing \[transfers\]"),
    ("[backbone]\n[[transfers]]\naux='demo_aux'\ntargets=['demo_target']\n", "needs 'arch'"),
])
def test_malformed_protocols(tmp_path: Path, body: str, match: str):
    f = tmp_path / "p.toml"
    f.write_text(body)
    with pytest.raises(protocol.ProtocolError, match=match):
        protocol.load(f)


def test_unknown_protocol_name():
    with pytest.raises(protocol.ProtocolError, match="Built-in: adaclip_paper, demo, full, full_uniform"):
        protocol.load("nope")


def test_digest_ignores_selection_but_not_settings(tmp_path: Path):
    a = protocol.load(write_protocol(tmp_path / "a.toml"))
    b = protocol.load(write_protocol(tmp_path / "b.toml", seeds="[0]", methods='["clip"]'))
    c = protocol.load(write_protocol(tmp_path / "c.toml", extra="[hparams.clip]\nclass_aware = false\n"))
    assert a.digest() == b.digest() != c.digest()


def test_per_transfer_hparams(tmp_path: Path):
    p = write_protocol(tmp_path / "p.toml", extra="[hparams.clip]\nclass_aware = false\n")
    text = p.read_text().replace('targets = ["demo_target"]',
                                 'targets = ["demo_target"]\n[transfers.hparams.clip]\nclass_aware = true\n')
    p.write_text(text)
    proto = protocol.load(p)
    assert proto.hparams_for("clip", "demo_aux") == {"class_aware": True}
    assert proto.hparams_for("clip", "elsewhere") == {"class_aware": False}
    full = protocol.validate(protocol.load("full"), methods=METHODS.names(), datasets=ADAPTERS.names())
    assert full.hparams_for("vand", "visa")["epochs"] == 15
    assert "epochs" not in full.hparams_for("vand", "mvtec")


def test_digest_ignores_resources_and_scheduling(tmp_path: Path):
    a = protocol.load(write_protocol(tmp_path / "a.toml"))
    text = (tmp_path / "a.toml").read_text().replace(
        "[run]\n", "[run]\nloader_workers = 4\nclaim_stale_minutes = 30\n")
    text += '\n[run.slurm]\npartition = "gpu"\ngpus = 1\n'
    (tmp_path / "b.toml").write_text(text)
    b = protocol.load(tmp_path / "b.toml")
    assert b.run["slurm"]["partition"] == "gpu" and a.digest() == b.digest()
    (tmp_path / "c.toml").write_text(text.replace("[run]\n", '[run]\nprecision = "bf16"\n'))
    assert protocol.load(tmp_path / "c.toml").digest() != a.digest()   # numbers may change


def test_epochs_scale_scales_every_epoch_count(tmp_path: Path):
    """``[run] epochs_scale`` multiplies each hyperparameter a method counts in epochs:
    AA-CLIP's text stage (``text_epochs``) as well as its image stage."""
    from bench.runner import Runner

    p = write_protocol(tmp_path / "p.toml", extra="[hparams.vand]\nepochs = 18\n")
    p.write_text(p.read_text().replace("[run]\n", "[run]\nepochs_scale = 0.5\n"))
    runner = Runner(protocol.load(p), tmp_path / "R", tmp_path / "data", progress=False)
    aaclip = METHODS.get("aaclip").default_hparams
    hp = runner.hparams("aaclip", "demo_aux")
    assert (hp["epochs"], hp["text_epochs"]) == (round(aaclip["epochs"] * 0.5),
                                                 max(1, round(aaclip["text_epochs"] * 0.5)))
    assert runner.hparams("vand", "demo_aux")["epochs"] == 9          # the protocol's 18, halved
    assert runner.hparams("tokenclip", "demo_aux")["epochs"] == 15     # the paper's 30, halved
    assert "epochs" not in runner.hparams("clip", "demo_aux")          # training-free: untouched
