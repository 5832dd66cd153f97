"""Hand-crafted prompt vocabularies of the training-free methods (CLIP, WinCLIP, AnoCLIP).

Only words live here; :func:`bench.backbone.compose_prompts` turns templates × states ×
object words into sentences and :func:`bench.backbone.prompt_ensemble_features` into class
prototypes. A state either has a ``{}`` slot for the object words (``"{} with flaw"``) or is
a word put in front of them (``"damaged"``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# -- vanilla CLIP (AnoCLIP §3.1, Eq. 1-2: the baseline every ZSAD paper prints) ---------------

#: "a photo of a normal [class]" / "a photo of an abnormal [class]" (Deng et al. 2023, §3.1).
CLIP_NORMAL_PROMPTS = ("a photo of a normal {}.",)
CLIP_ANOMALOUS_PROMPTS = ("a photo of an abnormal {}.",)

# -- WinCLIP compositional prompt ensemble (Jeong et al. 2023, §4.1 and appendix) ------------

#: State-level prompts, normal: the object alone and six "perfect" states.
WINCLIP_NORMAL_STATES = (
    "{}", "flawless {}", "perfect {}", "unblemished {}",
    "{} without flaw", "{} without defect", "{} without damage",
)
#: State-level prompts, anomalous.
WINCLIP_ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
#: Template-level prompts: 22 templates, each in its "a" and "the" form.
WINCLIP_TEMPLATES = (
    "a cropped photo of the {}.", "a cropped photo of a {}.",
    "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of a {}.", "a photo of the {}.",
    "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)
#: anomalib's list (``models/image/winclip/prompting.py``): 21 entries, without
#: "a cropped photo of a {}." and "a jpeg corrupted photo of a {}.", and with
#: "a jpeg corrupted photo of the {}." twice. Used only to reproduce anomalib exactly.
ANOMALIB_WINCLIP_TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of a {}.", "a photo of the {}.",
    "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)

# -- AnoCLIP domain-aware contrastive state prompts (Deng et al. 2023, §3.3) ----------------

#: 22 base templates "collected from CLIP" (§4.1) — the WinCLIP set, which is also the base
#: list of the authors' code; the domain phrase replaces "photo" (see :func:`domain_templates`).
ANOCLIP_BASE_TEMPLATES = WINCLIP_TEMPLATES
#: 7 contrastive state pairs (normal, anomalous), e.g. "perfect" vs "imperfect" (§3.3).
ANOCLIP_STATE_PAIRS = (
    ("normal {}", "abnormal {}"),
    ("flawless {}", "damaged {}"),
    ("perfect {}", "imperfect {}"),
    ("unblemished {}", "blemished {}"),
    ("{} without flaw", "{} with flaw"),
    ("{} without defect", "{} with defect"),
    ("{} without damage", "{} with damage"),
)
#: 4 domain-aware phrases per benchmark domain (§3.3: "industrial photo" for products,
#: "textural photo" for textures). The industrial set follows the authors' code; the medical
#: set is this benchmark's extension to its medical targets (the paper has none).
ANOCLIP_DOMAINS: dict[str, tuple[str, ...]] = {
    "industrial": ("industrial photo", "industrial image", "manufacturing image", "textural photo"),
    "medical": ("medical photo", "medical image", "clinical photo", "clinical image"),
}


def domain_templates(templates: Sequence[str], domains: Sequence[str]) -> list[str]:
    """AnoCLIP's "A [domain] photo of a [state] [class]": ``photo`` -> each domain phrase.

    ``"a cropped photo of the {}."`` with ``"industrial photo"`` gives ``"a cropped industrial
    photo of the {}."``; the article before the phrase becomes "an" before a vowel
    (``"an industrial photo of a {}."``). Domain-major order.
    """
    out = []
    for d in domains:
        for t in templates:
            if not re.search(r"\bphoto\b", t):
                raise ValueError(f"template {t!r} has no word 'photo' to make domain-aware")
            s = re.sub(r"\bphoto\b", d, t, count=1)
            s = re.sub(r"\ba (?=[aeiou])", "an ", s)
            out.append(s)
    return out
