"""CoCoOp: CoOp's context shifted per image by a meta-net of the image feature (Zhou et al. 2022)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dgaug.trainer.prompts import PromptLearner

META_REDUCTION = 16  # CoCoOp's bottleneck: vis_dim -> vis_dim // 16 -> ctx_dim


class ConditionalPromptLearner(PromptLearner):
    """CoOp's learner plus a meta-net: image feature x -> pi(x), added to every context vector.

    As CoCoOp's public code (KaiyangZhou/CoOp, trainers/cocoop.py): the meta-net is
    Linear(D, D // 16) - ReLU - Linear(D // 16, width) on the unit-norm image feature; image i's
    prompt for class c is ``[SOS] (ctx + pi(x_i)) {class c}.``, so each image gets its own class
    text embeddings, and its logits are the scaled cosines to them. The meta-net's weights are
    drawn from a generator seeded with `seed` (so two runs with one seed start equal).
    """

    def __init__(self, model, tokenizer, classnames, *, image_dim: int, seed: int = 0, **kw):
        super().__init__(model, tokenizer, classnames, seed=seed, **kw)
        width = int(self.ctx.shape[1])
        hidden = max(1, image_dim // META_REDUCTION)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.meta_net = torch.nn.Sequential(
                torch.nn.Linear(image_dim, hidden),
                torch.nn.ReLU(),
                torch.nn.Linear(hidden, width),
            )
        self.meta_net.to(self.ctx.device)

    def shift(self, image_features: torch.Tensor) -> torch.Tensor:
        """pi(x): [B, width], the meta-net's shift of the context for each image."""
        x = F.normalize(image_features.float(), dim=-1).to(self.ctx.device)
        return self.meta_net(x)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """[B, C, embed_dim] unit-norm class text embeddings conditioned on each image."""
        ctx = self.ctx.unsqueeze(0) + self.shift(image_features).unsqueeze(1)
        return self.encode(ctx)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, C] cosines of each image to its own class text embeddings (differentiable)."""
        text = self.forward(image_features).float()
        x = F.normalize(image_features.float(), dim=-1).to(text.device)
        return torch.einsum("bd,bcd->bc", x, text)

    @torch.no_grad()
    def classifier(self, chunk: int = 64) -> Callable[[torch.Tensor], torch.Tensor]:
        """images [N, D] -> [N, C] cosines on the CPU, computed `chunk` images at a time (each
        image runs C prompts through the text tower, so the whole set at once may not fit)."""

        def classify(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                parts = [
                    self.logits(images[i : i + chunk]).cpu() for i in range(0, len(images), chunk)
                ]
            return torch.cat(parts) if parts else torch.zeros(0, len(self.classnames))

        return classify
