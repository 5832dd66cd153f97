"""The opt-in released-code tests' shared gate (tests/released_code.py) in the default suite:
a missing or unimportable checkout skips the module with the recipe, never fails it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.released_code import how_to, released_checkout, thop_stub


def test_how_to_names_the_variable_repository_and_command():
    text = how_to("X_SRC", "owner/Repo", "tests/test_released_x.py", ", make `y` importable")
    assert text == ("set X_SRC to a checkout of https://github.com/owner/Repo (e.g. `git clone "
                    "https://github.com/owner/Repo /tmp/Repo`), make `y` importable, then run "
                    "`X_SRC=/tmp/Repo pytest --runslow tests/test_released_x.py` — see this "
                    "file's docstring")


def test_released_checkout_skips_unset_or_unimportable_and_returns_the_import(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("X_SRC", raising=False)
    with pytest.raises(pytest.skip.Exception, match="X_SRC is not set: RECIPE"):
        released_checkout("X_SRC", "X", "RECIPE", lambda p: p)

    def broken(path: Path):
        raise ImportError(f"{path} has no x.py")

    monkeypatch.setenv("X_SRC", str(tmp_path))
    with pytest.raises(pytest.skip.Exception,
                       match=r"released X code is not importable .*ImportError.*has no x\.py.*RECIPE"):
        released_checkout("X_SRC", "X", "RECIPE", broken)
    assert released_checkout("X_SRC", "X", "RECIPE", lambda p: ("mods", p)) == (
        tmp_path, ("mods", tmp_path))


def test_thop_stub_only_where_thop_is_missing(monkeypatch: pytest.MonkeyPatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    stub = thop_stub()["thop"]
    assert stub.profile is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert thop_stub() == {}
