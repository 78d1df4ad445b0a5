"""The adaptation methods. Each loss term reads the joint forward pass `TransferModule` makes when a batch carries
a target domain: `batch["features"]` (source), `batch["target"]["features"]` and `batch["target"]["logits"]`.

DANN (Ganin et al. 2016) and CDAN (Long et al. 2018) train a domain discriminator through a gradient reversal
layer; Deep CORAL (Sun & Saenko 2016) matches feature means and covariances; MCC (Jin et al. 2020) and entropy
minimisation act on the target predictions only. Hyperparameters follow the Transfer-Learning-Library defaults.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from src.adapt.base import Adapter, progress, ramp
from src.adapt.config import AdversarialConfig
from src.module import Batch, LossTerm


class Oracle(Adapter):
    """The upper bound, not an adaptation method: trains on the *labelled* target training images."""

    target_role = "oracle"


class GradientReverse(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -coeff, so the features learn to fool the
    discriminator that the same loss trains."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    return GradientReverse.apply(x, coeff)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-row Shannon entropy (nats) of probabilities."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


class DomainAdversarialLoss(nn.Module):
    """Binary domain classification (source 1, target 0) of `condition(features, probs)` behind a gradient
    reversal whose coefficient follows the ramp; logs the unweighted `train/domain_loss` and `train/domain_acc`."""

    def __init__(self, name: str, in_dim: int, cfg: AdversarialConfig) -> None:
        super().__init__()
        self.name, self.cfg = name, cfg
        self.discriminator = nn.Sequential(
            nn.Linear(in_dim, cfg.hidden),
            nn.BatchNorm1d(cfg.hidden),
            nn.ReLU(),
            nn.Linear(cfg.hidden, cfg.hidden),
            nn.BatchNorm1d(cfg.hidden),
            nn.ReLU(),
            nn.Linear(cfg.hidden, 1),
        )

    def condition(self, features: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return features

    def forward(self, module: pl.LightningModule, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        target = batch["target"]
        features = torch.cat([batch["features"], target["features"]])
        probs = torch.cat([logits, target["logits"]]).softmax(-1).detach()
        coeff = ramp(progress(module)) if self.cfg.ramp else 1.0
        domain_logits = self.discriminator(grad_reverse(self.condition(features, probs), coeff)).squeeze(-1)
        is_source = torch.cat([torch.ones(len(logits)), torch.zeros(len(target["logits"]))]).to(domain_logits)
        loss = F.binary_cross_entropy_with_logits(domain_logits, is_source)
        acc = ((domain_logits > 0).float() == is_source).float().mean()
        n = len(is_source)
        module.log("train/domain_loss", loss, on_step=False, on_epoch=True, batch_size=n)
        module.log("train/domain_acc", acc, on_step=False, on_epoch=True, batch_size=n)
        return self.cfg.weight * loss


class ConditionalDomainAdversarialLoss(DomainAdversarialLoss):
    """CDAN: the discriminator sees the multilinear map features ⊗ predictions (randomised when too large)."""

    def __init__(self, name: str, feature_dim: int, num_classes: int, cfg: AdversarialConfig) -> None:
        randomized = feature_dim * num_classes > 4096
        super().__init__(name, cfg.randomized_dim if randomized else feature_dim * num_classes, cfg)
        self.randomized = randomized
        if randomized:  # fixed random projections (Long et al. 2018, Sec. 3.3), saved with the weights
            self.register_buffer("rf", torch.randn(feature_dim, cfg.randomized_dim))
            self.register_buffer("rg", torch.randn(num_classes, cfg.randomized_dim))

    def condition(self, features: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        if self.randomized:
            return (features @ self.rf) * (probs @ self.rg) / math.sqrt(self.cfg.randomized_dim)
        return torch.bmm(probs.unsqueeze(2), features.unsqueeze(1)).flatten(1)


class DANN(Adapter):
    """Domain-adversarial training: a discriminator on the pooled features behind a gradient reversal."""

    target_role = "adapt"
    aligns_features = True

    def __init__(self, cfg: AdversarialConfig, feature_dim: int, num_classes: int) -> None:
        super().__init__(cfg, feature_dim, num_classes)
        self.term = DomainAdversarialLoss("dann", feature_dim, cfg)

    def loss_terms(self) -> list[LossTerm]:
        return [self.term]


class CDAN(DANN):
    """Conditional DANN: the discriminator is conditioned on the classifier's predictions."""

    def __init__(self, cfg: AdversarialConfig, feature_dim: int, num_classes: int) -> None:
        Adapter.__init__(self, cfg, feature_dim, num_classes)
        self.term = ConditionalDomainAdversarialLoss("cdan", feature_dim, num_classes, cfg)


class WeightedTerm:
    """A loss on the joint pass, times the adapter's ramped weight; logs the unweighted value as `train/<name>_raw`."""

    def __init__(self, name: str, adapter: Adapter) -> None:
        self.name, self.adapter = name, adapter

    def loss(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, module: pl.LightningModule, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        value = self.loss(batch, logits)
        module.log(f"train/{self.name}_raw", value, on_step=False, on_epoch=True, batch_size=len(logits))
        return self.adapter.weight(module) * value


class CoralLoss(WeightedTerm):
    def loss(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        return coral(batch["features"], batch["target"]["features"])


def coral(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the feature means plus of the feature covariances (TLlib's CORAL loss)."""
    mean_s, mean_t = source.mean(0, keepdim=True), target.mean(0, keepdim=True)
    cov_s = (source - mean_s).T @ (source - mean_s) / max(len(source) - 1, 1)
    cov_t = (target - mean_t).T @ (target - mean_t) / max(len(target) - 1, 1)
    return (mean_s - mean_t).pow(2).mean() + (cov_s - cov_t).pow(2).mean()


class Coral(Adapter):
    """Deep CORAL: align the second-order statistics of source and target features."""

    target_role = "adapt"
    aligns_features = True

    def loss_terms(self) -> list[LossTerm]:
        return [CoralLoss("coral", self)]


class MCCLoss(WeightedTerm):
    def __init__(self, name: str, adapter: Adapter, temperature: float) -> None:
        super().__init__(name, adapter)
        self.temperature = temperature

    def loss(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        return minimum_class_confusion(batch["target"]["logits"], self.temperature)


def minimum_class_confusion(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Between-class confusion of the target predictions, certain samples weighted up (Jin et al. 2020)."""
    n, classes = logits.shape
    probs = (logits / temperature).softmax(-1)
    weights = 1 + torch.exp(-entropy(probs).detach())
    weights = (n * weights / weights.sum()).unsqueeze(1)
    confusion = (probs * weights).T @ probs
    confusion = confusion / confusion.sum(dim=1)
    return (confusion.sum() - confusion.trace()) / classes


class MCC(Adapter):
    """Minimum class confusion on the target predictions (needs no feature alignment: works with a linear probe)."""

    target_role = "adapt"

    def loss_terms(self) -> list[LossTerm]:
        return [MCCLoss("mcc", self, self.cfg.temperature)]


class EntropyLoss(WeightedTerm):
    def loss(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        return entropy(batch["target"]["logits"].softmax(-1)).mean()


class EntropyMinimization(Adapter):
    """Entropy minimisation on the target predictions (Grandvalet & Bengio 2005)."""

    target_role = "adapt"

    def loss_terms(self) -> list[LossTerm]:
        return [EntropyLoss("entropy", self)]
