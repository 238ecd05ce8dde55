"""The training modes as loop tasks: contrastive CLIP on pairs, a linear probe, CoOp, CoCoOp."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from dgaug.core.hashing import derive_seed
from dgaug.trainer.data import DataError, FeatureSet, Pair, decode_image


def _seed(*parts: object) -> int:
    """A 63-bit seed from any parts: the same parts give the same stream on every machine."""
    return derive_seed(*parts, byteorder="little")


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_seed(seed, "order", epoch))
    return torch.randperm(n, generator=g)


_count_lock = threading.Lock()


def load_pixels(preprocess, pair: Pair, skipped: Counter[str]) -> torch.Tensor | None:
    """A pair's image through `preprocess`; None (counted by reason) when it cannot be used.

    A shards source keeps image bytes as they came, so a bad image can reach the trainer; as in
    the stages, it costs that sample only, and the same bytes are skipped on every run.
    """
    from dgaug.core.images import skip_reason

    try:
        return preprocess(decode_image(pair.image.read()))
    except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for bad bytes
        with _count_lock:
            skipped[skip_reason(e)] += 1
        return None


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor):
    """CLIP's symmetric InfoNCE over a batch of matched (image, text) rows."""
    logits = scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class ClipTask:
    """Contrastive training of an open_clip model on real pairs plus their ED-SAM samples.

    Each micro-batch holds `batch_size` real pairs; the first round(batch_size * edsam_ratio) of
    them also bring one of their ED-SAM samples (chosen by seed), captioned with the source
    caption. The loss is ED-SAM's `L_CLIP(x_s, p_s) + L_CLIP(x*, p_s)`.
    """

    def __init__(
        self,
        clip,  # dgaug.models.clip.ClipModel, unfrozen by the caller
        real: Sequence[Pair],
        edsam: Sequence[Pair],
        *,
        batch_size: int,
        edsam_ratio: float,
        seed: int,
        decode_threads: int,
    ):
        self.clip = clip
        self.model = clip.model
        self.real = list(real)
        self.batch_size = batch_size
        self.seed = seed
        by_source: dict[str, list[Pair]] = {}
        for p in edsam:
            if p.source_key is not None:
                by_source.setdefault(p.source_key, []).append(p)
        self.edsam = {k: sorted(v, key=lambda p: p.key) for k, v in by_source.items()}
        self.n_edsam = round(batch_size * edsam_ratio) if self.edsam else 0
        if len(self.real) < batch_size:
            raise DataError(
                f"{len(self.real)} real pairs to train on, fewer than one batch of {batch_size}"
            )
        self.pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="train-decode")
        self.skipped: Counter[str] = Counter()  # undecodable images by reason
        self._order: tuple[int, torch.Tensor] | None = None

    def micro_batches_per_epoch(self) -> int:
        return len(self.real) // self.batch_size  # the last partial batch is dropped, as open_clip

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())

    def _rows(self, epoch: int, index: int) -> list[Pair]:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.real), self.seed, epoch))
        idx = self._order[1][index * self.batch_size : (index + 1) * self.batch_size]
        return [self.real[i] for i in idx.tolist()]

    def _pixels(self, pairs: Sequence[Pair]) -> list[torch.Tensor | None]:
        """Each pair's preprocessed image; None for one that cannot be decoded (counted)."""
        pre = self.clip.preprocess
        return list(self.pool.map(lambda p: load_pixels(pre, p, self.skipped), pairs))

    def _loss(self, pairs: Sequence[Pair], captions: Sequence[str]) -> torch.Tensor | None:
        pixels = self._pixels(pairs)
        keep = [i for i, x in enumerate(pixels) if x is not None]
        if len(keep) < 2:  # a contrastive loss needs a negative
            return None
        tokens = self.clip.tokenizer([captions[i] for i in keep]).to(self.clip.device)
        images = torch.stack([pixels[i] for i in keep]).to(self.clip.device)
        dev = self.clip.device
        with torch.autocast(
            dev.type, dtype=self.clip.dtype, enabled=self.clip.dtype != torch.float32
        ):
            img = self.model.encode_image(images)
            txt = self.model.encode_text(tokens)
        return clip_loss(img.float(), txt.float(), self.model.logit_scale.exp())

    def loss(self, epoch: int, index: int) -> torch.Tensor:
        rows = self._rows(epoch, index)
        loss = self._loss(rows, [p.caption for p in rows])
        if loss is None:
            raise DataError(
                f"batch {index} of epoch {epoch} has fewer than 2 decodable images "
                f"(skipped so far: {dict(self.skipped)})"
            )
        partners = self.partners(rows, epoch, index)
        extra = self._loss([e for e, _ in partners], [c for _, c in partners])
        return loss if extra is None else loss + extra

    def partners(self, rows: Sequence[Pair], epoch: int, index: int) -> list[tuple[Pair, str]]:
        """(ED-SAM sample, its source's caption) for the first n_edsam rows that have samples."""
        g = torch.Generator().manual_seed(_seed(self.seed, "edsam", epoch, index))
        out = []
        for p in rows[: self.n_edsam]:
            choices = self.edsam.get(p.key)
            pick = int(torch.randint(len(choices) if choices else 1, (1,), generator=g))
            if choices:
                out.append((choices[pick], p.caption))
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def weighted_cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """Mean cross-entropy with each row's loss times its weight (None: all 1).

    Divided by the batch size, not by the sum of the weights: a batch of synthetic rows alone
    then still counts `synthetic_weight` times a real one, as a weighted empirical risk does.
    """
    if weights is None:
        return F.cross_entropy(logits, y)
    w = weights.to(logits.device)
    return (F.cross_entropy(logits, y, reduction="none") * w).sum() / len(y)


class _FeatureTask:
    """Shared by the feature modes: float32 features with class indices, batches by seeded order.

    `weights`: one loss weight per row of `train` (the real : synthetic weight); None: all 1.
    """

    def __init__(
        self,
        train: FeatureSet,
        classnames: Sequence[str],
        batch_size: int,
        seed: int,
        weights: torch.Tensor | None = None,
    ):
        index = {c: i for i, c in enumerate(classnames)}
        keep = [i for i, label in enumerate(train.labels) if label in index]
        if not keep:
            raise DataError("no training row has a label among the classes")
        self.x = F.normalize(train.embeddings[keep].float(), dim=-1)
        self.y = torch.tensor([index[train.labels[i]] for i in keep])
        self.w = None if weights is None else weights.float()[keep]
        self.batch_size = min(batch_size, len(keep))
        self.seed = seed
        self._order: tuple[int, torch.Tensor] | None = None

    def micro_batches_per_epoch(self) -> int:
        return len(self.y) // self.batch_size

    def _indices(self, epoch: int, index: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.y), self.seed, epoch))
        return self._order[1][index * self.batch_size : (index + 1) * self.batch_size]

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._indices(epoch, index)
        return self.x[idx], self.y[idx]

    def batch_weights(self, epoch: int, index: int) -> torch.Tensor | None:
        return None if self.w is None else self.w[self._indices(epoch, index)]

    def close(self) -> None:
        pass


class ProbeTask(_FeatureTask):
    """A linear classifier on frozen CLIP image features (real, plus LDFS synthetic rows)."""

    def __init__(
        self,
        train: FeatureSet,
        classnames: Sequence[str],
        batch_size: int,
        seed: int,
        weights: torch.Tensor | None = None,
    ):
        super().__init__(train, classnames, batch_size, seed, weights)
        g = torch.Generator().manual_seed(_seed(seed, "probe-init"))
        d, c = self.x.shape[1], len(classnames)
        self.weight = torch.nn.Parameter(torch.randn(c, d, generator=g) * 0.01)
        self.bias = torch.nn.Parameter(torch.zeros(c))

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return {"weight": self.weight, "bias": self.bias}

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.float(), dim=-1) @ self.weight.T + self.bias

    def loss(self, epoch: int, index: int) -> torch.Tensor:
        x, y = self.batch(epoch, index)
        return weighted_cross_entropy(self.logits(x), y, self.batch_weights(epoch, index))


class CoopTask(_FeatureTask):
    """CoOp: learnable context words before each class name; CLIP and the image features frozen."""

    def __init__(
        self,
        learner,
        train: FeatureSet,
        classnames,
        batch_size: int,
        seed: int,
        scale,
        weights=None,
    ):
        super().__init__(train, classnames, batch_size, seed, weights)
        self.learner = learner
        self.scale = float(scale)

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.learner.named_parameters())

    def loss(self, epoch: int, index: int) -> torch.Tensor:
        x, y = self.batch(epoch, index)
        classes = self.learner().float()
        x, y = x.to(classes.device), y.to(classes.device)
        logits = self.scale * x @ classes.T
        return weighted_cross_entropy(logits, y, self.batch_weights(epoch, index))


class CocoopTask(CoopTask):
    """CoCoOp: CoOp's context plus a meta-net shift per image; the class texts are re-encoded for
    every image of the batch (B * C prompts through the frozen text tower per micro-batch)."""

    def loss(self, epoch: int, index: int) -> torch.Tensor:
        x, y = self.batch(epoch, index)
        logits = self.scale * self.learner.logits(x)
        return weighted_cross_entropy(logits, y.to(logits.device), self.batch_weights(epoch, index))
