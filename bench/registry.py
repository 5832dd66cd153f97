"""Method and dataset-adapter registries.

A plugin is found in one of three ways:

* a module of the ``methods`` (or ``dataset_adapters``) package — found by scanning it;
* a Python file named with ``--plugin FILE.py`` (:func:`load_plugin`);
* an installed package exposing the entry-point group ``zsad_bench.methods``
  (``zsad_bench.datasets`` for adapters).

Registering two different objects under one name is an error that names both places.
The engine never imports a specific method or dataset: it asks these registries.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import sys
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(Exception):
    """A registration or look-up problem; the message says where and how to fix it."""


def _origin(obj: Any) -> str:
    try:
        src = inspect.getsourcefile(obj) or "<unknown file>"
        line = inspect.getsourcelines(obj)[1]
        return f"{src}:{line} ({obj.__module__}.{obj.__qualname__})"
    except (TypeError, OSError):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


class Registry(Generic[T]):
    """A name -> class mapping with lazy discovery of its plugins."""

    def __init__(self, kind: str, package: str, entry_point_group: str) -> None:
        self.kind = kind
        self.package = package
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._discovered = False

    # -- registration -------------------------------------------------------------
    def add(self, name: str, obj: T) -> T:
        if not name or not isinstance(name, str):
            raise RegistryError(f"{self.kind} at {_origin(obj)} needs a non-empty string name")
        origin = _origin(obj)
        if name in self._items:
            old = self._items[name]
            same = (getattr(old, "__module__", None), getattr(old, "__qualname__", None)) == (
                getattr(obj, "__module__", None), getattr(obj, "__qualname__", None))
            if not (same and self._origins[name] == origin):
                raise RegistryError(
                    f"{self.kind} name '{name}' is registered twice: first at {self._origins[name]}, "
                    f"again at {origin}. Rename one of them."
                )
        self._items[name] = obj
        self._origins[name] = origin
        return obj

    def decorator(self, name: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            if hasattr(obj, "name") and isinstance(obj, type):
                obj.name = name  # type: ignore[attr-defined]
            return self.add(name, obj)

        return wrap

    # -- discovery ----------------------------------------------------------------
    def discover(self) -> None:
        """Import every module of the package and every installed entry point (once)."""
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(pkg.__path__, prefix=f"{self.package}."):
            if mod.name.rsplit(".", 1)[-1].startswith("_"):
                continue
            importlib.import_module(mod.name)
        for ep in metadata.entry_points(group=self.entry_point_group):
            try:
                ep.load()
            except Exception as err:  # noqa: BLE001 - report which plugin broke
                raise RegistryError(
                    f"entry point '{ep.name} = {ep.value}' (group {self.entry_point_group}) failed "
                    f"to load: {err!r}. Reinstall or uninstall the package that provides it."
                ) from err

    def get(self, name: str) -> T:
        self.discover()
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "none"
            raise RegistryError(
                f"unknown {self.kind} '{name}'. Known: {known}. "
                f"Add a module to '{self.package}/', pass --plugin FILE.py, or install a package "
                f"with entry point group '{self.entry_point_group}'."
            )
        return self._items[name]

    def origin(self, name: str) -> str:
        self.get(name)
        return self._origins[name]

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        for name in self.names():
            yield name, self._items[name]

    def __contains__(self, name: str) -> bool:
        self.discover()
        return name in self._items


METHODS: Registry[type] = Registry("method", "methods", "zsad_bench.methods")
ADAPTERS: Registry[type] = Registry("dataset adapter", "dataset_adapters", "zsad_bench.datasets")


def load_plugin(path: str | Path) -> list[str]:
    """Import a plugin file; return the method and adapter names it registered."""
    path = Path(path).expanduser().resolve()
    if path.suffix != ".py" or not path.is_file():
        raise RegistryError(f"plugin {path}: not a Python file. Pass the path of a .py file that "
                            "registers a method with @register('name').")
    before_m, before_a = set(METHODS._items), set(ADAPTERS._items)
    mod_name = f"zsad_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}"
    if mod_name in sys.modules:
        return []
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise RegistryError(f"plugin {path}: cannot be imported as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except RegistryError:
        del sys.modules[mod_name]
        raise
    except Exception as err:
        del sys.modules[mod_name]
        raise RegistryError(f"plugin {path} failed to import: {type(err).__name__}: {err}. "
                            "Fix the error in that file (run `python FILE.py` to see the traceback).") from err
    added = sorted((set(METHODS._items) - before_m) | (set(ADAPTERS._items) - before_a))
    if not added:
        raise RegistryError(f"plugin {path} registered nothing. Decorate a Method subclass with "
                            "@register('name') from methods.base.")
    return added


def create_method(name: str, backbone: Any, **hparams: Any):
    """Instantiate the registered method ``name`` on ``backbone`` with ``hparams``."""
    cls = METHODS.get(name)
    return cls(backbone, **hparams)


def get_adapter(name: str):
    """An instance of the registered dataset adapter ``name``."""
    return ADAPTERS.get(name)()
