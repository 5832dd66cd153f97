"""``fit(epochs=0)`` trains nothing: 0 is a number of epochs, not "use the paper's default".

The fit loops once read ``epochs or hp["epochs"]``, so an explicit 0 (a protocol's
``[hparams.<m>] epochs = 0``) silently trained for the paper's full budget.
"""

from __future__ import annotations

import pytest
import torch

from bench.registry import create_method
from methods.base import _toy_batches

#: methods whose whole training is the ``epochs`` loop (AA-CLIP has a second, text stage)
SINGLE_STAGE = ["vand", "afclip", "coop", "anomalyclip", "tokenclip", "mpa", "faprompt"]


@pytest.mark.parametrize("name", SINGLE_STAGE)
def test_zero_epochs_train_nothing_and_one_epoch_trains(name, tiny_backbone):
    batches = _toy_batches(tiny_backbone.image_size, n_batches=1, batch_size=4)
    torch.manual_seed(0)
    method = create_method(name, tiny_backbone)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.fit(batches, epochs=0, seed=0)
    after_zero = method.state_dict()
    assert before.keys() == after_zero.keys() and before
    assert all(torch.equal(before[k], after_zero[k]) for k in before)
    method.fit(batches, epochs=1, seed=0)
    after_one = method.state_dict()
    assert any(not torch.equal(before[k], after_one[k]) for k in before)
