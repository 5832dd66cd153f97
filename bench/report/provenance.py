"""Provenance of the runs shown (protocol, commit, environment) and the protocol note every
table caption starts with."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.results import read_provenance


def provenances(results_dir: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(Path(results_dir).rglob("provenance.json")):
        try:
            json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        d = read_provenance(p.parent)  # with the per-job files (checkpoints, backbones)
        env = d.get("environment", {})
        out.append({
            "run": str(p.parent), "protocol": d.get("protocol", ""),
            "protocol_hash": d.get("protocol_hash", ""),
            "git_commit": env.get("git_commit") or "unknown",
            "git_dirty": env.get("git_dirty"), "device": env.get("device", ""),
            "python": env.get("python", ""), "platform": env.get("platform", ""),
            "versions": env.get("versions", {}), "backbone": d.get("backbone", {}),
            "inputs": d.get("inputs", {}),
            "seeds": d.get("seeds", []), "n_checkpoints": len(d.get("checkpoints", {})),
            "json": json.dumps(d, indent=2, sort_keys=True, default=str),
        })
    return out


def protocol_note(provs: list[dict[str, Any]], methods: Sequence[str]) -> str:
    """The sentence every table starts with: which protocol(s) the numbers come from, and
    the class words each method got where they differ (backbone settings are in the
    backbone line or column)."""
    names = sorted({p["protocol"] for p in provs if p.get("protocol")})
    if not names:
        return ""
    note = f"Protocol: {', '.join(names)}. "
    words: dict[str, list[str]] = {}
    for p in provs:
        for m, inp in (p.get("inputs") or {}).items():
            if m in methods and inp.get("class_words"):
                words.setdefault(str(inp["class_words"]), [])
                if m not in words[str(inp["class_words"])]:
                    words[str(inp["class_words"])].append(m)
    if len(words) > 1:
        label = {"folder": "folder ids (metal_nut)", "readable": "readable names (metal nut)"}
        parts = [f"{label.get(w, w)} for {', '.join(ms)}" for w, ms in sorted(words.items())]
        note += f"Class words: {'; '.join(parts)}. "
    return note
