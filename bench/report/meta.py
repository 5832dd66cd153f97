"""Metadata of methods and datasets: display names, domains, BibTeX, the papers' order.

The registries are optional here: missing metadata (or a broken plugin) must not break the
report, so every lookup falls back to :mod:`bench.reported`'s names and known defaults.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from bench import reported

#: Domains of the canonical datasets, used when an adapter is not importable.
KNOWN_DOMAINS = {
    **dict.fromkeys(["mvtec", "visa", "mpdd", "btad", "sdd", "dagm", "dtd_synthetic"], "industrial"),
    **dict.fromkeys(["isic", "clinicdb", "colondb", "kvasir", "endo", "headct", "brainmri",
                     "br35h"], "medical"),
}


def _method_cls(name: str) -> Any:
    try:
        from bench.registry import METHODS

        return METHODS.get(name) if name in METHODS else None
    except Exception:  # noqa: BLE001 - a broken plugin must not break the report
        return None


def _adapter_cls(name: str) -> Any:
    try:
        from bench.registry import ADAPTERS

        return ADAPTERS.get(name) if name in ADAPTERS else None
    except Exception:  # noqa: BLE001
        return None


def dataset_meta(name: str) -> dict[str, str]:
    """Display name, domain and BibTeX of a dataset id (falls back to known defaults)."""
    cls = _adapter_cls(name)
    display = getattr(cls, "display_name", "") or reported.DATASET_NAMES.get(name, name)
    domain = getattr(cls, "domain", "") if cls is not None else ""
    domain = domain or KNOWN_DOMAINS.get(name, "other")
    return {"id": name, "name": display, "domain": domain,
            "bibtex": (getattr(cls, "bibtex", "") or "").strip()}


def method_meta(name: str) -> dict[str, Any]:
    """Display name, paper, BibTeX and training kind of a registered method."""
    cls = _method_cls(name)
    return {"id": name, "name": reported.method_display(name),
            "paper": getattr(cls, "paper", "") or "",
            "bibtex": (getattr(cls, "bibtex", "") or "").strip(),
            "trains": getattr(cls, "trains", None)}


def method_order(names: Iterable[str]) -> list[str]:
    """Known methods in the papers' (roughly chronological) order, then the rest by name."""
    known = list(reported.METHOD_NAMES)
    names = set(names)
    return [n for n in known if n in names] + sorted(names - set(known))


def dataset_order(names: Iterable[str]) -> list[str]:
    """Canonical datasets in the design's order, then the rest by name."""
    known = list(reported.DATASET_NAMES)
    names = set(names)
    return [n for n in known if n in names] + sorted(names - set(known))


def _slug(s: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", str(s)).strip("-").lower() or "x"
