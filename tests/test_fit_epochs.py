"""``fit(epochs=0)`` trains nothing: 0 is a number of epochs, not "use the paper's default"; the shared loop.

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


def test_train_steps_is_the_plain_loop_and_restores_eval_mode():
    """``methods.common.train_steps`` (every trained method's loop) against the loop written out."""
    from methods.common import train_steps

    def setup():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1))
        opt = torch.optim.Adam(net.parameters(), lr=0.1)
        return net, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    data = [torch.randn(5, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def loss_of(net):
        def loss(x):
            assert net.training
            return net(x).pow(2).mean()
        return loss

    net, opt, sched = setup()
    seen: list[float] = []
    train_steps(net, opt, 2, lambda: iter(data), loss_of(net), scheduler=sched, losses=seen)
    ref, ref_opt, ref_sched = setup()
    ref.train()
    expected = []
    for _ in range(2):
        for x in data:
            value = ref(x).pow(2).mean()
            ref_opt.zero_grad()
            value.backward()
            ref_opt.step()
            ref_sched.step()
            expected.append(float(value.detach()))
    assert seen == expected and len(seen) == 6
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))
    assert not net.training and sched.last_epoch == 6

    def failing(x):  # a failing step leaves the module in eval mode, the earlier losses kept
        if len(kept) == 2:
            raise RuntimeError("boom")
        return net(x).pow(2).mean()

    kept: list[float] = []
    with pytest.raises(RuntimeError, match="boom"):
        train_steps(net, opt, 1, lambda: iter(data), failing, losses=kept)
    assert len(kept) == 2 and not net.training
