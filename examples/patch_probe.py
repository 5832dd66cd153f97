"""An example plugin: a linear probe on CLIP patch tokens, trained on the auxiliary data.

Run it with:  zsad-bench run --protocol demo --plugin examples/patch_probe.py --methods patch_probe
"""

import torch
import torch.nn.functional as F

from methods.base import Method, Prediction, register


@register("patch_probe")
class PatchProbe(Method):
    """Linear probe on last-layer patch tokens (an example plugin, not a paper's method)."""

    trains = True
    default_hparams = {"epochs": 2, "lr": 1e-2}

    def __init__(self, backbone, **hparams):
        super().__init__(backbone, **hparams)
        self.head = torch.nn.Linear(backbone.embed_dim, 1)

    def _patch_logits(self, images):
        bb = self.backbone
        with torch.no_grad():
            tokens = bb.encode_image(images.to(bb.device), layers=[bb.num_layers]).taps[bb.num_layers]
            feats = F.normalize(bb.project_tokens(tokens[:, 1:]), dim=-1)
        return self.head(feats)[..., 0].reshape(-1, 1, *([bb.grid_size] * 2))

    def fit(self, aux_loader, *, epochs=None, seed=0, progress=iter):
        opt = torch.optim.Adam(self.head.parameters(), lr=self.hparams["lr"])
        for _ in range(epochs or self.hparams["epochs"]):
            for batch in progress(aux_loader):
                logits = self._patch_logits(batch["image"])
                target = F.adaptive_max_pool2d(batch["mask"][:, None].to(logits.device), logits.shape[-2:])
                loss = F.binary_cross_entropy_with_logits(logits, target)
                opt.zero_grad()
                loss.backward()
                opt.step()

    @torch.no_grad()
    def predict(self, batch):
        logits = self._patch_logits(batch["image"])
        maps = F.interpolate(logits.sigmoid(), size=batch["image"].shape[-2:], mode="bilinear")[:, 0]
        return Prediction(maps.flatten(1).amax(dim=1), maps)
