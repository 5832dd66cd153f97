"""A diagnostic plugin: ``demo_aux_heldout``, new images of the auxiliary set's categories.

The demo evaluates zero-shot transfer (``demo_aux`` -> ``demo_target``). To tell a method
that learns nothing from a method whose learning does not transfer, evaluate it as well on
unseen images *of the auxiliary categories*: ``demo_aux``'s generator with another seed (new
crops, new defects; same sources, tints and defect types). Nothing of it is used in training.

Run it with (about 25 minutes for the trained methods, 5 seeds, on 2 CPU cores)::

    zsad-bench --plugin examples/heldout_aux.py run --protocol examples/heldout_aux.toml \\
        --results results/heldout_aux
    zsad-bench --plugin examples/heldout_aux.py report results/heldout_aux

Figures and what they show: docs/methods.md, "The trained methods on the demo".
"""

from typing import ClassVar

from dataset_adapters.base import register_adapter
from dataset_adapters.demo import DemoAux


@register_adapter("demo_aux_heldout")
class DemoAuxHeldout(DemoAux):
    """``demo_aux``'s categories, generated again with another seed: an in-domain test set."""

    display_name: ClassVar[str] = "Demo auxiliary, held-out images (diagnostic)"
    seed: ClassVar[int] = 20240903
