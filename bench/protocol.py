"""The benchmark as data: a protocol TOML file -> a validated :class:`Protocol`.

A protocol names the backbone, the image size, the methods (with hyperparameter
overrides), the seeds and the auxiliary -> targets transfers. Built-in protocols live in
``bench/protocols/`` (``demo``, ``full``); any other TOML path works too::

    name = "my-protocol"
    seeds = [0, 1, 2, 3, 4]
    methods = ["clip", "anomalyclip"]     # or "all": every registered method
    [backbone]
    arch = "ViT-L-14-336"
    pretrained = "openai"                 # open_clip tag, checkpoint path, or "zsad-toy"
    image_size = 518
    [run]
    batch_size = 8                        # evaluation batch size
    [[transfers]]
    aux = "mvtec"
    targets = ["visa", "mpdd"]
    [[transfers]]
    aux = "visa"
    targets = ["mvtec"]
    hparams = { vand = { epochs = 15 } }  # settings that depend on the auxiliary dataset
    [[transfers]]
    aux = ["visa", "clinicdb"]            # several datasets: trained on their union
    targets = ["colondb"]                 # (records and hparams name it "visa+clinicdb")
    [hparams.anomalyclip]                 # per-method overrides of the paper defaults
    epochs = 15
    [backbones.winclip]                   # a method that runs on another backbone
    arch = "ViT-B-16-plus-240"
    pretrained = "laion400m_e31"
    image_size = 240
    [backbones.vand]                      # or other settings of the main one (arch inherited)
    activation = "gelu"                   # reproduce the released code's GELU bug
    [class_words]                         # words for the object in class-aware prompts
    default = "readable"                  # "readable" ("metal nut") or "folder" ("metal_nut")
    [datasets.mvtec]                      # optional per-dataset data roots
    root = "/data/mvtec_anomaly_detection"
    [few_shot]                            # k normal references per category, few-shot methods
    afclip_plus = [1, 2, 4]               # (default [1]); each k is its own job

**Inputs as the authors ran them.** ``activation`` and ``pos_embed_resize`` of a backbone and
the ``class_words`` a method gets are resolved per method: the protocol's per-method value
(``[backbones.M]``, ``[class_words] M``), else its protocol-wide value (``[backbone]`` — for
methods on that backbone: a ``[backbones.M]`` table with its own ``arch`` inherits nothing —,
``[class_words] default``), else what the method's released code does (the method class's
``released_inputs``), else the suite's default (activation from the weights — QuickGELU for
OpenAI's —, ``"open_clip"`` resize, ``"readable"`` words). ``full.toml`` leaves them to the
methods; ``full_uniform.toml`` sets them once for all (bench.backbone, docs/methods.md).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROTOCOL_DIR = Path(__file__).parent / "protocols"
TOY_PRETRAINED = "zsad-toy"
#: ``[run]`` keys that do not change a job's numbers (resources, scheduling): not in the digest
RUN_KEYS_NOT_HASHED = ("slurm", "claim_stale_minutes", "loader_workers", "feature_cache_dir",
                       "feature_cache_gb", "decoded_cache_mb")
#: ``class_words`` values: the adapter's readable prompt name, or the dataset's folder id verbatim.
CLASS_WORDS = ("readable", "folder")
#: The settings a method's released code fixes and a protocol may override (see module docstring).
INPUT_SETTINGS = ("activation", "pos_embed_resize", "class_words")
#: Suite defaults where neither the protocol nor the method says (activation: from the weights).
INPUT_DEFAULTS: dict[str, str | None] = {"activation": None, "pos_embed_resize": "open_clip",
                                         "class_words": "readable"}


class ProtocolError(ValueError):
    """The protocol file is wrong; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone as a protocol names it. ``activation``/``pos_embed_resize`` None: not set here
    (resolved per method by :meth:`Protocol.backbone_for`; for loading: the suite default)."""

    arch: str
    pretrained: str | None = None
    image_size: int | None = None
    activation: str | None = None
    pos_embed_resize: str | None = None

    def key(self) -> str:
        """Identity of the loaded backbone: every setting that changes its features."""
        from bench.backbone import native_image_size

        resize = self.pos_embed_resize or INPUT_DEFAULTS["pos_embed_resize"]
        if self.image_size in (None, native_image_size(self.arch)):
            resize = "native"  # nothing is resized: one backbone (and feature cache) for all
        return f"{self.arch}|{self.pretrained}|{self.image_size}|{self.activation}|{resize}"

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`bench.backbone.load_clip` for the settings."""
        return {"activation": self.activation,
                "pos_embed_resize": self.pos_embed_resize or INPUT_DEFAULTS["pos_embed_resize"]}


#: Joins the datasets of a multi-dataset auxiliary split in its id (``"mvtec+colondb"``).
AUX_JOIN = "+"


def aux_parts(aux: str) -> tuple[str, ...]:
    """The datasets of an auxiliary split id: ``"mvtec+colondb"`` -> ``("mvtec", "colondb")``."""
    return tuple(aux.split(AUX_JOIN))


@dataclass(frozen=True)
class Transfer:
    """Train on ``aux`` (one dataset id, or several joined by ``+``: trained on their union),
    evaluate on every target."""

    aux: str
    targets: tuple[str, ...]
    #: per-method settings that hold for this auxiliary dataset only (e.g. VAND's 15 epochs on VisA)
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def aux_datasets(self) -> tuple[str, ...]:
        return aux_parts(self.aux)


@dataclass
class Protocol:
    name: str
    backbone: BackboneSpec
    methods: list[str]
    seeds: list[int]
    transfers: list[Transfer]
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    backbones: dict[str, BackboneSpec] = field(default_factory=dict)
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    few_shot: dict[str, list[int]] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    class_words: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def backbone_for(self, method: str, released: dict[str, str] | None = None) -> BackboneSpec:
        """The backbone ``method`` runs on, every input setting resolved (module docstring).

        ``released``: the method's ``released_inputs`` (default: looked up in the registry).
        """
        # a [backbones.M] table without 'arch' already carries [backbone]'s settings (_spec);
        # one with its own arch (other weights) inherits none of them
        spec = self.backbones.get(method, self.backbone)
        rel = _released_inputs(method) if released is None else released
        values = {key: _first(getattr(spec, key), rel.get(key), INPUT_DEFAULTS[key])
                  for key in ("activation", "pos_embed_resize")}
        return replace(spec, **values)

    def class_words_for(self, method: str, released: dict[str, str] | None = None) -> str:
        """``"readable"`` or ``"folder"``: the object words ``method`` gets (module docstring)."""
        rel = _released_inputs(method) if released is None else released
        return str(_first(self.class_words.get(method), self.class_words.get("default"),
                          rel.get("class_words"), INPUT_DEFAULTS["class_words"]))

    def inputs_for(self, method: str) -> dict[str, Any]:
        """Everything a method is fed, resolved: backbone settings and class words (provenance)."""
        spec = self.backbone_for(method)
        return {**asdict(spec), "pos_embed_resize": spec.load_kwargs()["pos_embed_resize"],
                "class_words": self.class_words_for(method)}

    def hparams_for(self, method: str, aux: str) -> dict[str, Any]:
        """Protocol-wide overrides of ``method``, then those of the transfer from ``aux``."""
        hp = dict(self.hparams.get(method, {}))
        for t in self.transfers:
            if t.aux == aux:
                hp.update(t.hparams.get(method, {}))
                break
        return hp

    def training_hparams(self, method: str, aux: str) -> dict[str, Any]:
        """:meth:`hparams_for` with ``[run] epochs_scale`` applied to every hyperparameter the
        method counts in epochs (``Method.epoch_hparams``; the class default where unset)."""
        from bench.registry import METHODS

        hp = self.hparams_for(method, aux)
        cls = METHODS.get(method)
        scale = float(self.run.get("epochs_scale", 1.0))
        if cls.trains and scale != 1.0:
            for key in cls.epoch_hparams:  # e.g. AA-CLIP's two stages
                base = hp.get(key, cls.default_hparams.get(key, 1))
                hp[key] = max(1, round(base * scale))
        return hp

    def digest(self) -> str:
        """A content hash of the settings that change a job's numbers (not which jobs run)."""
        d = asdict(self)
        for key in ("source", "methods", "seeds", "name"):  # selection, not settings
            d.pop(key)
        d["datasets"] = {k: {kk: vv for kk, vv in v.items() if kk != "root"}
                         for k, v in self.datasets.items()}
        # where and how fast a run goes does not change its numbers
        d["run"] = {k: v for k, v in d["run"].items() if k not in RUN_KEYS_NOT_HASHED}
        # input settings (issue 14) enter the hash only where set: older protocols keep theirs
        for spec in (d["backbone"], *d["backbones"].values()):
            for key in ("activation", "pos_embed_resize"):
                if spec[key] is None:
                    spec.pop(key)
        if not d["class_words"]:
            d.pop("class_words")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def all_datasets(self) -> list[str]:
        seen: list[str] = []
        for t in self.transfers:
            for d in (*t.aux_datasets, *t.targets):
                if d not in seen:
                    seen.append(d)
        return seen


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _released_inputs(method: str) -> dict[str, str]:
    """A registered method class's ``released_inputs`` ({} for unknown names)."""
    from bench.registry import METHODS, RegistryError

    try:
        cls = METHODS.get(method)
    except RegistryError:  # unregistered: nothing to inherit
        return {}
    return dict(getattr(cls, "released_inputs", {}) or {})


def resolve_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path).expanduser()
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ProtocolError(f"{p}: protocol file not found. Built-in protocols: "
                                f"{', '.join(builtin_names())}")
        return p
    builtin = PROTOCOL_DIR / f"{name_or_path}.toml"
    if not builtin.is_file():
        raise ProtocolError(f"unknown protocol '{name_or_path}'. Built-in: "
                            f"{', '.join(builtin_names())}; or pass the path of a .toml file")
    return builtin


def builtin_names() -> list[str]:
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.toml"))


_SPEC_KEYS = ("arch", "pretrained", "image_size", "activation", "pos_embed_resize")


def _spec(d: dict[str, Any], where: str, base: BackboneSpec | None = None) -> BackboneSpec:
    """A ``[backbone]`` table; a ``[backbones.M]`` table without ``arch`` changes ``base``'s settings."""
    unknown = set(d) - set(_SPEC_KEYS)
    if unknown:
        raise ProtocolError(f"{where}: unknown keys {sorted(unknown)}; use {', '.join(_SPEC_KEYS)}")
    if "arch" not in d and base is None:
        raise ProtocolError(f"{where}: needs 'arch' (an open_clip architecture, e.g. ViT-L-14-336)")
    from bench.backbone import ACTIVATIONS, POS_EMBED_RESIZES

    for key, allowed in (("activation", ACTIVATIONS), ("pos_embed_resize", POS_EMBED_RESIZES)):
        if key in d and d[key] not in allowed:
            raise ProtocolError(f"{where}: {key} = {d[key]!r}; use one of {', '.join(allowed)}")
    if "arch" not in d:
        return replace(base, **{k: d[k] for k in d})
    size = d.get("image_size")
    return BackboneSpec(str(d["arch"]), d.get("pretrained"), int(size) if size else None,
                        d.get("activation"), d.get("pos_embed_resize"))


def load(name_or_path: str | Path) -> Protocol:
    """Read and structurally validate a protocol (see :func:`validate` for registry checks)."""
    path = resolve_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ProtocolError(f"{path}: not valid TOML ({err})") from err
    known = {"name", "description", "seeds", "methods", "backbone", "run", "transfers",
             "hparams", "backbones", "datasets", "few_shot", "class_words"}
    unknown = set(raw) - known
    if unknown:
        raise ProtocolError(f"{path}: unknown top-level keys {sorted(unknown)}; known: {sorted(known)}")
    for key in ("backbone", "transfers"):
        if key not in raw:
            raise ProtocolError(f"{path}: missing [{key}]")
    methods = raw.get("methods", "all")
    if isinstance(methods, str):
        methods = [methods]
    seeds = raw.get("seeds", [0, 1, 2, 3, 4])
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ProtocolError(f"{path}: 'seeds' must be a list of distinct non-negative integers")
    transfers = []
    for i, t in enumerate(raw["transfers"]):
        if "aux" not in t or not t.get("targets"):
            raise ProtocolError(f"{path}: transfers[{i}] needs 'aux' and a non-empty 'targets' list")
        aux = t["aux"]
        if isinstance(aux, list):  # several datasets trained on at once (AdaCLIP's protocol)
            if not aux or len(set(aux)) != len(aux) or any(AUX_JOIN in str(a) for a in aux):
                raise ProtocolError(f"{path}: transfers[{i}] aux must be a dataset id or a list of "
                                    f"distinct dataset ids, got {aux!r}")
            aux = AUX_JOIN.join(str(a) for a in aux)
        extra = set(t) - {"aux", "targets", "hparams"}
        if extra:
            raise ProtocolError(f"{path}: transfers[{i}] has unknown keys {sorted(extra)}; "
                                "use aux, targets, hparams")
        transfers.append(Transfer(str(aux), tuple(str(x) for x in t["targets"]),
                                  {k: dict(v) for k, v in t.get("hparams", {}).items()}))
    few_shot = {str(k): list(v) for k, v in raw.get("few_shot", {}).items()}
    for k, v in few_shot.items():
        if not v or not all(isinstance(x, int) and x > 0 for x in v):
            raise ProtocolError(f"{path}: [few_shot] {k} must be a list of positive integers (shots)")
    class_words = {str(k): v for k, v in raw.get("class_words", {}).items()}
    for k, v in class_words.items():
        if v not in CLASS_WORDS:
            raise ProtocolError(f"{path}: [class_words] {k} = {v!r}; use one of {', '.join(CLASS_WORDS)}")
    main = _spec(raw["backbone"], f"{path} [backbone]")
    proto = Protocol(
        name=str(raw.get("name", path.stem)),
        backbone=main,
        methods=[str(m) for m in methods],
        seeds=list(seeds),
        transfers=transfers,
        hparams={k: dict(v) for k, v in raw.get("hparams", {}).items()},
        backbones={k: _spec(v, f"{path} [backbones.{k}]", main)
                   for k, v in raw.get("backbones", {}).items()},
        datasets={k: dict(v) for k, v in raw.get("datasets", {}).items()},
        few_shot=few_shot,
        run=dict(raw.get("run", {})),
        class_words=class_words,
        source=str(path),
    )
    check_leakage(proto)
    return proto


def check_leakage(proto: Protocol) -> None:
    """Refuse a transfer that evaluates on the dataset it trains on (zero-shot means unseen)."""
    for t in proto.transfers:
        inside = [d for d in t.aux_datasets if d in t.targets]
        if inside:
            raise ProtocolError(
                f"{proto.source}: transfer aux='{t.aux}' also lists {', '.join(map(repr, inside))} "
                f"as a target. Zero-shot transfer never evaluates on the auxiliary dataset(s) it "
                f"trains on; remove it from targets (or evaluate it in a transfer that does not "
                f"train on it)."
            )
        if len(set(t.targets)) != len(t.targets):
            raise ProtocolError(f"{proto.source}: transfer aux='{t.aux}' lists a target twice")


def validate(proto: Protocol, *, methods: list[str], datasets: list[str]) -> Protocol:
    """Check every method and dataset name against the registries; expand ``"all"``."""
    if proto.methods == ["all"]:
        proto.methods = list(methods)
    unknown = [m for m in proto.methods if m not in methods]
    if unknown:
        raise ProtocolError(f"{proto.source}: unknown methods {unknown}. Registered: "
                            f"{', '.join(methods)} (add one with --plugin FILE.py)")
    words = {k: v for k, v in proto.class_words.items() if k != "default"}
    for section in (proto.hparams, proto.backbones, proto.few_shot, words,
                    *(t.hparams for t in proto.transfers)):
        extra = [m for m in section if m not in methods]
        if extra:
            raise ProtocolError(f"{proto.source}: settings for unknown methods {extra}")
    unknown_ds = [d for d in proto.all_datasets() if d not in datasets]
    if unknown_ds:
        raise ProtocolError(f"{proto.source}: unknown datasets {unknown_ds}. Known: {', '.join(datasets)}")
    return proto
