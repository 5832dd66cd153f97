"""Words and tokens of the toy CLIP: caption and prompt templates, normal and damaged
states, defect words, colours, the photo sources and their phrases, sentence building, and
the known tokens of open_clip's tokenizer."""

from __future__ import annotations

import re

from bench.demo.toyclip.arch import ARCH

# -- words ------------------------------------------------------------------------------

#: Caption / prompt templates (CLIP ImageNet-style, plus the inspection and domain
#: phrasings that ZSAD prompt ensembles use); ``{}`` takes the state and object words.
TEMPLATES = (
    "a photo of a {}.", "a photo of the {}.", "a cropped photo of the {}.",
    "a cropped photo of a {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.",
    "a dark photo of a {}.", "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a jpeg corrupted photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a photo of the small {}.", "a photo of a small {}.", "a photo of the large {}.",
    "a photo of a large {}.", "this is a photo of a {}.", "this is a photo of the {}.",
    "there is a {} in the scene.", "there is the {} in the scene.",
    "a low resolution photo of a {}.", "a good photo of a {}.", "a picture of a {}.",
    "an image of a {}.", "a {}.", "the {}.",
    "a photo of a {} for visual inspection.", "a photo of the {} for anomaly detection.",
    "an industrial photo of a {}.", "a manufacturing image of the {}.",
    "a textural photo of a {}.", "an industrial image of the {}.",
    "a medical photo of a {}.", "a clinical image of the {}.",
)
#: States of a normal object; ``{}`` takes the object words.
NORMAL_STATES = (
    "{}", "flawless {}", "perfect {}", "unblemished {}", "normal {}", "good {}", "intact {}",
    "clean {}", "undamaged {}", "pristine {}", "{} without flaw", "{} without defect",
    "{} without damage",
)
#: States of a damaged object.
ANOMALOUS_STATES = (
    "damaged {}", "broken {}", "defective {}", "flawed {}", "abnormal {}", "{} with defect",
    "faulty {}", "imperfect {}", "blemished {}", "{} with damage", "{} with flaw",
    "anomalous {}", "{} with a defect",
)
#: Caption words for each defect kind of :mod:`bench.demo.synthetic`.
DEFECT_WORDS = {
    "scratch": ("scratched", "with a scratch", "with scratches"),
    "hole": ("punctured", "with a hole", "with holes"),
    "stain": ("stained", "with a stain", "with stains"),
    "crack": ("cracked", "with a crack", "with cracks"),
    "cut": ("patched", "with a misplaced patch", "with a pasted patch"),
}
#: Named colours (RGB 0-255) of the procedural images and tints.
COLOURS = {
    "red": (200, 40, 40), "green": (50, 160, 60), "blue": (40, 70, 200),
    "yellow": (230, 210, 50), "orange": (235, 130, 30), "purple": (130, 50, 160),
    "pink": (235, 140, 180), "brown": (120, 75, 40), "black": (20, 20, 20),
    "white": (235, 235, 235), "grey": (128, 128, 128), "cyan": (50, 200, 210),
}

#: skimage.data photos the corpus draws from -> object phrases used in captions.
#: Must stay disjoint from the demo target's sources (see HELD_OUT_SOURCES, tests).
CORPUS_SOURCES: dict[str, tuple[str, ...]] = {
    "camera": ("man with a camera", "photographer"),
    "coins": ("coins", "old coins"),
    "moon": ("moon surface", "lunar surface"),
    "rocket": ("rocket", "launch pad"),
    "clock": ("clock", "wall clock"),
    "page": ("page of text", "printed page"),
    "text": ("text", "printed text"),
    "hubble_deep_field": ("galaxies", "night sky"),
    "immunohistochemistry": ("tissue sample", "stained tissue"),
    "retina": ("retina", "eye fundus"),
    "colorwheel": ("colour wheel", "rainbow"),
    "logo": ("logo", "snake logo"),
    "cell": ("cell", "microscope image"),
    "microaneurysms": ("retina", "blood vessels"),
    "horse": ("horse silhouette", "horse"),
    "lfw_subset": ("face", "person"),
    "stereo_motorcycle": ("motorcycle", "motorbike"),
    "brick": ("brick wall", "bricks"),
    "grass": ("grass", "lawn"),
    "gravel": ("gravel", "stones"),
    "binary_blobs": ("blobs", "spots"),
    "checkerboard": ("checkerboard", "chessboard"),
    "shepp_logan_phantom": ("phantom", "scan"),
}
#: skimage.data photos the corpus must never use: the demo target's sources and aliases.
HELD_OUT_SOURCES = ("coffee", "chelsea", "cat", "astronaut")

#: Procedural pattern kinds -> caption pattern ({a}, {b}: colour words).
PROCEDURAL = {
    "stripes": "{a} and {b} stripes",
    "grid": "{a} grid on {b}",
    "checkerboard": "{a} and {b} checkerboard",
    "dots": "{a} dots on {b}",
    "noise": "{a} and {b} noise texture",
    "blobs": "{a} blobs on {b}",
    "gradient": "{a} to {b} gradient",
    "circle": "{a} circle on {b}",
    "square": "{a} square on {b}",
    "triangle": "{a} triangle on {b}",
    "waves": "{a} and {b} waves",
    "rings": "{a} and {b} rings",
    "clouds": "{a} and {b} cloudy texture",
    "shapes": "colourful overlapping shapes",
}


# -- sentences --------------------------------------------------------------------------

def _article(text: str) -> str:
    """"a" -> "an" before a vowel."""
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def _sentence(template: str, state: str, obj: str) -> str:
    return _article(re.sub(r"\s+", " ", template.format(state.format(obj))).strip())


# -- tokens ------------------------------------------------------------------------------

def tokenizer():
    """open_clip's tokenizer of ``zsad-tiny`` (the SimpleTokenizer, context 77)."""
    import open_clip

    from bench.backbone import register_model_configs

    register_model_configs()
    return open_clip.get_tokenizer(ARCH)


class _Vocab:
    """Token pieces for captions and prompts, built by concatenating word encodings.

    open_clip's BPE splits text into words (and punctuation) before merging, so the
    tokens of a sentence are the concatenation of the tokens of its words; encoding each
    piece once keeps prompt building cheap. :func:`encode` checks that equivalence.
    """

    def __init__(self) -> None:
        tok = tokenizer()
        self._bpe = tok.tokenizer if hasattr(tok, "tokenizer") else tok
        self.sot = self._bpe.encoder["<start_of_text>"]
        self.eot = self._bpe.encoder["<end_of_text>"]
        self.context_length = 77
        self._cache: dict[str, list[int]] = {}

    def piece(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self._bpe.encode(text) if text.strip() else []
        return self._cache[text]

    def encode(self, text: str) -> list[int]:
        ids = [self.sot] + self.piece(text) + [self.eot]
        return ids[: self.context_length]


def _known_texts() -> list[str]:
    """Every text the model is trained on, word by word (defines the known vocabulary)."""
    words: list[str] = [t.replace("{}", " ") for t in TEMPLATES + NORMAL_STATES + ANOMALOUS_STATES]
    words += ["an"]
    for v in DEFECT_WORDS.values():
        words += list(v)
    # every procedural phrase, also those of the optional natural-like kinds: the shipped
    # checkpoint's token table was built with them (its hash depends on it)
    words += list(COLOURS) + [p.format(a="", b="") for p in PROCEDURAL.values()]
    for phrases in CORPUS_SOURCES.values():
        words += list(phrases)
    words += ["object", "pattern", "texture", "photo", "background", "tinted", "and"]
    return words


def known_token_ids(vocab: _Vocab | None = None) -> list[int]:
    """Sorted ids of every token the corpus and prompts use (plus start/end of text)."""
    vocab = vocab or _Vocab()
    ids = {vocab.sot, vocab.eot}
    for t in _known_texts():
        ids.update(vocab.piece(t))
    return sorted(ids)
