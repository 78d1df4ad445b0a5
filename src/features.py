"""The frozen-feature cache: what the frozen part of a network computes for a data set, computed once and shared
across epochs, runs, sweep trials and parallel workers (entries in the `features` namespace of `src.cache`).

What is cached, per split (train / val / test), in float32 and in data-set order:

- **the frozen prefix's output** when the first k layer groups stay frozen for the whole run (`linear_probe`:
  k = all groups, the pooled features; `partial`: the backbone's state after group k, e.g. MiniLM's hidden
  states, stored per sentence without padding). The splits are replaced by these tensors, so batches hold no
  raw inputs and only the layer groups after the cut run (`Backbone.forward_from`). A backbone without the split
  API at k (see `Backbone.cuts`) caches at the largest cut below k it supports, or not at all;
- **the pooled features** attached to every sample when some epochs train the head only (`lp_ft`'s probe epochs
  and `probe_fit`, a `milestones`/`gradual_unfreeze` schedule's first epochs): used in those epochs;
- **a distillation teacher's logits**, attached to every sample.

Named evaluation sets (`data.eval_sets`) are splits too (`eval/<name>`), each keyed by its spec and source rather
than its name (`DataModule.split_identity`), so a corrupted test split's features are computed once, and adding a
set leaves the other splits' entries valid.

The frozen part runs in eval mode (no dropout; batch norm on its running statistics), so it is deterministic:
frozen groups holding batch norm are cached only under the default `finetune.bn` policy (eval mode, affine
frozen). When the training inputs are augmented (regularization.augment / mixup, an image folder's flips) the
training batches bypass the cache; validation and test still use it.

The key is everything that determines the values: the model's weights (`state_digest`, taken after `init_from`),
its class and settings (pooling, ...), the cut, the preprocessing (the tokenizer's full definition, or image
size / channels / normalisation), the data module's identity (its config without loader knobs, the content digest
of every data file, the seed that draws subsets and splits), the split and the dtype.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from src.backbones.base import Backbone, Preprocessing
from src.cache import Cache, fingerprint, state_digest
from src.config import CacheConfig
from src.data.common import DataModule, LengthOrder, lengths_of
from src.finetune.bn import batch_norms
from src.finetune.strategy import Strategy
from src.module import FROZEN, TransferModule

if TYPE_CHECKING:
    from src.config import RunConfig
    from src.tracking import MLflowRun

log = logging.getLogger(__name__)

NAMESPACE = "features"
VERSION = 1  # bump when the stored layout changes
DTYPE = torch.float32
FROZEN_TOKENS = "frozen_tokens"  # a sample's token states (L_i, H); batches get them padded, under FROZEN
Entry = dict[str, torch.Tensor]


# --- what to cache -----------------------------------------------------------------------------------------------


def frozen_prefix(strategy: Strategy, n_groups: int, epochs: int) -> int:
    """Leading layer groups that stay frozen in every one of the run's `epochs`."""
    cut = n_groups
    for epoch in range(epochs):
        cut = min(cut, min(strategy.trainable_groups(epoch, n_groups), default=n_groups))
    return cut


def deterministic(strategy: Strategy, backbone: Backbone, cut: int) -> bool:
    """Whether the first `cut` groups compute a fixed function while frozen: no trainable adapters inside, and any
    batch norm in eval mode with its affine frozen (the default `finetune.bn`)."""
    bn = strategy.cfg.bn
    has_bn = any(True for group in backbone.layer_groups()[:cut] for _ in batch_norms(group))
    return strategy.frozen_groups_fixed and not (has_bn and (bn.train_affine or not bn.eval_mode))


def fixed_state(strategy: Strategy, module: nn.Module, backbone: Backbone, epochs: int) -> set[str]:
    """`module.state_dict()` keys of the backbone's leading layer groups that no epoch changes (frozen throughout,
    deterministic): checkpoints can leave them out, since the run rebuilds them as they were (see
    `TransferModule.fixed_state`). For a linear probe that is the whole backbone: a checkpoint holds the head."""
    groups = backbone.layer_groups()
    frozen = frozen_prefix(strategy, len(groups), epochs)
    if frozen == 0 or not deterministic(strategy, backbone, frozen):
        return set()
    names = {id(m): name for name, m in module.named_modules()}
    return {f"{names[id(m)]}.{key}" for group in groups[:frozen] for m in group.modules for key in m.state_dict()}


def prefix_what(cut: int, groups: int) -> dict[str, Any]:
    """The cache key's `what` for the output of the first `cut` of the backbone's `groups` layer groups (all of
    them: the pooled features, the entry a linear probe reads; src.rank computes the same one)."""
    return {"output": "frozen prefix" if cut < groups else "features", "cut": cut, "groups": groups}


def static_cut(strategy: Strategy, backbone: Backbone, epochs: int) -> int:
    """The cut to cache for the whole run (0: none): the frozen prefix, or the largest cut below it the backbone
    can split at, when the prefix is deterministic."""
    n = len(backbone.layer_groups())
    frozen = frozen_prefix(strategy, n, epochs)
    if frozen == 0:
        return 0
    if not deterministic(strategy, backbone, frozen):
        log.info("features: not cached, the %d frozen groups are not deterministic (adapters or finetune.bn)", frozen)
        return 0
    cut = max((c for c in backbone.cuts() if c <= frozen), default=0)
    if cut < frozen:
        log.info(
            "features: %s cannot split its forward after %d layer groups; %s",
            *(type(backbone).__name__, frozen, f"caching after {cut}" if cut else "the frozen groups run every step"),
        )
    return cut


def probes(strategy: Strategy, n_groups: int, epochs: int) -> bool:
    """Whether some epochs train the head only, or the strategy extracts the frozen backbone's features."""
    head_only = any(not strategy.trainable_groups(epoch, n_groups) for epoch in range(epochs))
    return strategy.extracts_features or head_only


# --- keys --------------------------------------------------------------------------------------------------------


def preprocessing_identity(p: Preprocessing) -> dict[str, Any]:
    """What turns raw samples into model inputs: the tokenizer's whole definition, or the image transform."""
    if p.modality == "text":
        tokenizer = p.tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            definition: Any = sorted(tokenizer.get_vocab().items())
        else:  # without the truncation/padding state that calling the tokenizer sets (max_length is in the data key)
            definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        return {"tokenizer": type(tokenizer).__name__, "definition": fingerprint(definition)}
    return {"image_size": p.image_size, "channels": p.channels, "mean": list(p.mean), "std": list(p.std)}


def model_identity(model: nn.Module) -> dict[str, Any]:
    """A model's weights and the plain settings that change its output without being weights (e.g. pooling)."""
    settings = {
        k: v
        for k, v in vars(model).items()
        if not k.startswith("_") and k != "training" and isinstance(v, str | int | float)
    }
    return {"class": type(model).__name__, "settings": settings, "weights": state_digest(model)}


# --- computing entries -------------------------------------------------------------------------------------------


def _device(accelerator: str | None) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and accelerator not in ("cpu",) else "cpu")


@torch.no_grad()
def encode(
    fn: Callable[[dict[str, Any]], Any],
    model: nn.Module,
    dataset: Dataset,
    collate: Callable | None,
    batch_size: int,
    device: torch.device,
    desc: str,
) -> Entry:
    """`fn` (the model in eval mode) over every sample of `dataset`, stored in dataset order: `values` (N, ...),
    or for token states `tokens` (sum of lengths, H) + `lengths` (N,); plus `labels` (N,)."""
    lengths = lengths_of(dataset)  # text in order of length: batches need little padding
    order = list(range(len(dataset))) if lengths is None else LengthOrder(lengths, batch_size).order
    loader = DataLoader(torch.utils.data.Subset(dataset, order), batch_size, collate_fn=collate or default_collate)
    was_training, original = model.training, next(model.parameters()).device
    model.eval().to(device)
    values: list[torch.Tensor] = []
    lengths: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    # Forked RNG: a miss must leave the run's random stream (shuffling, dropout) as a hit does, so that a cached
    # run gives the same result whether or not it computed the entries.
    with torch.random.fork_rng(devices=[]):
        try:
            for batch in tqdm(loader, desc=desc, leave=False, disable=None):
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                out = fn(batch)
                labels.append(batch["labels"].cpu())
                if isinstance(out, dict):  # token states: keep the real tokens of each sample, in order
                    mask = out["attention_mask"].bool()
                    values.append(out["hidden_states"][mask].to(DTYPE).cpu())
                    lengths.append(mask.sum(dim=1).cpu())
                else:
                    values.append(out.to(DTYPE).cpu())
        finally:
            model.train(was_training).to(original)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    entry = {"labels": torch.cat(labels)[inverse]}
    if not lengths:
        return {**entry, "values": torch.cat(values)[inverse]}
    sizes = torch.cat(lengths)
    pieces = torch.cat(values).split(sizes.tolist())
    return {**entry, "tokens": torch.cat([pieces[i] for i in inverse.tolist()]), "lengths": sizes[inverse]}


# --- datasets and collation --------------------------------------------------------------------------------------


class _Delegating(Dataset):
    """Attributes it lacks are the raw split's (`files`, `images`, ...), for code that reads them after a run."""

    raw: Dataset

    def __getattr__(self, name: str) -> Any:
        if name == "raw":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.raw, name)


class CachedSplit(_Delegating):
    """A split as the frozen prefix's outputs: samples `{FROZEN or FROZEN_TOKENS: state, "labels": y}`."""

    def __init__(self, entry: Entry, raw: Dataset) -> None:
        self.raw = raw
        self.labels = entry["labels"]
        self.values = entry.get("values")
        if self.values is None:
            self.tokens = entry["tokens"].split(entry["lengths"].tolist())

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def pooled(self) -> bool:
        """Whether samples are pooled feature vectors (evaluating them is only the head's work)."""
        return self.values is not None

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.values is None:
            return {FROZEN_TOKENS: self.tokens[index], "labels": self.labels[index]}
        return {FROZEN: self.values[index], "labels": self.labels[index]}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """A batch of pooled features as one indexing per tensor (the DataLoader asks for whole batches): no
        per-sample dicts to build and stack, which cost a cached linear probe more than its math."""
        if self.values is None:
            return [self[i] for i in indices]
        index = torch.as_tensor(indices, dtype=torch.long)
        return {FROZEN: self.values[index], "labels": self.labels[index]}


class WithCached(_Delegating):
    """A split's samples, each with its cached value(s) added under the given batch key(s)."""

    def __init__(self, raw: Dataset, cached: dict[str, torch.Tensor]) -> None:
        self.raw, self.cached = raw, cached

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.raw[index], **{key: values[index] for key, values in self.cached.items()}}


def _pad_tokens(states: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in states])
    mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
    return {"hidden_states": pad_sequence(list(states), batch_first=True), "attention_mask": mask}


class CachedCollate:
    """Collates cached values itself (token states padded, with their attention mask) and everything else with the
    data module's own collate function; a sample without raw inputs needs only its labels stacked."""

    def __init__(self, base: Callable | None, keys: Sequence[str]) -> None:
        self.base, self.keys = base or default_collate, (*keys, FROZEN_TOKENS)

    def __call__(self, items: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
        if isinstance(items, dict):  # a batch `CachedSplit.__getitems__` already assembled
            return items
        cached = [k for k in self.keys if k in items[0]]
        rest = [{k: v for k, v in item.items() if k not in cached} for item in items]
        batch = dict(self.base(rest)) if len(rest[0]) > 1 else {"labels": default_collate([r["labels"] for r in rest])}
        for key in cached:
            values = [item[key] for item in items]
            if key == FROZEN_TOKENS:
                batch[FROZEN] = _pad_tokens(values)
            else:
                batch[key] = torch.stack(values)
        return batch


# --- the run's hook ----------------------------------------------------------------------------------------------


class FrozenFeatureSwitch(pl.Callback):
    """Cached pooled features apply while the whole backbone is frozen: the epochs that train the head only."""

    def __init__(self, strategy: Strategy, n_groups: int) -> None:
        self.strategy, self.n_groups = strategy, n_groups

    def _set(self, trainer: pl.Trainer, pl_module: TransferModule) -> None:
        pl_module.use_frozen = not self.strategy.trainable_groups(trainer.current_epoch, self.n_groups)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: TransferModule) -> None:
        self._set(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: TransferModule) -> None:
        self._set(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: TransferModule) -> None:
        pl_module.use_frozen = False  # test/predict see the fine-tuned backbone


class FeatureCache:
    """Plans what a run caches, loads or computes the entries and rewires the data module and the module."""

    def __init__(self, cfg: CacheConfig, datamodule: DataModule, accelerator: str | None) -> None:
        self.cache = Cache(NAMESPACE, cfg.dir)
        self.datamodule = datamodule
        self.data = datamodule.identity()
        self.inputs = preprocessing_identity(datamodule.preprocessing)
        self.device = _device(accelerator)
        self.batch_size = max(datamodule.cfg.eval_batch_size or datamodule.cfg.batch_size, 64)
        self.identities: dict[int, dict[str, Any]] = {}  # per model: its weights are hashed once per run
        self.max_bytes = None if cfg.max_memory_gb is None else cfg.max_memory_gb * 1e9

    def splits(self, augmented: bool) -> list[str]:
        """The splits whose samples are the same every epoch: all but an augmented training split."""
        return [s for s in self.datamodule.splits if not (s == "train" and augmented)]

    def entry(self, split: str, model: nn.Module, what: dict[str, Any], fn: Callable[[dict[str, Any]], Any]) -> Entry:
        if id(model) not in self.identities:
            self.identities[id(model)] = model_identity(model)
        identity = self.identities[id(model)]
        split_key = self.datamodule.split_identity(split)
        key = fingerprint(VERSION, str(DTYPE), what, identity, self.inputs, self.data, split_key)
        desc = f"features: {what['output']} of {split}"
        dataset = self.datamodule.splits[split]
        misses = self.cache.stats.misses
        entry = self.cache.get_or_compute(
            key, lambda: encode(fn, model, dataset, self.datamodule.collate_fn, self.batch_size, self.device, desc)
        )
        found = "computed" if self.cache.stats.misses > misses else "read from the cache"
        log.info("%s: %s (%d samples, key %s)", desc, found, len(entry["labels"]), key)
        return entry

    @torch.no_grad()
    def estimate(self, split: str, model: nn.Module, fn: Callable[[dict[str, Any]], Any]) -> int:
        """Bytes the entry of `split` would hold, from one encoded sample (per token for token states)."""
        dataset = self.datamodule.splits[split]
        if not len(dataset):
            return 0
        batch = (self.datamodule.collate_fn or default_collate)([dataset[0]])
        was_training = model.training
        model.eval()
        with torch.random.fork_rng(devices=[]):
            out = fn(batch)
        model.train(was_training)
        if isinstance(out, dict):
            tokens = sum(len(dataset[i]["input_ids"]) for i in range(len(dataset)))
            return tokens * out["hidden_states"].shape[-1] * DTYPE.itemsize
        return len(dataset) * out[0].numel() * DTYPE.itemsize

    def fits(self, splits: list[str], model: nn.Module, fn: Callable[[dict[str, Any]], Any], what: str) -> bool:
        """Whether the entries fit `cache.max_memory_gb`; if not, one log line says so and the run goes uncached."""
        if self.max_bytes is None:
            return True
        need = sum(self.estimate(split, model, fn) for split in splits)
        if need <= self.max_bytes:
            return True
        log.warning(
            "features: the %s of %s would hold %.2f GB in memory, above cache.max_memory_gb=%g: training without "
            "the feature cache (raise it, or cache fewer layers with a larger finetune.k)",
            what,
            "/".join(splits),
            need / 1e9,
            self.max_bytes / 1e9,
        )
        return False

    def attach(self, strategy: Strategy, module: TransferModule, augmented: bool, epochs: int) -> list[pl.Callback]:
        backbone = module.backbone
        n = len(backbone.layer_groups())
        splits = self.splits(augmented)
        if augmented:
            log.info("features: training inputs are augmented, so training batches bypass the cache (val/test use it)")
        callbacks: list[pl.Callback] = []
        attached: dict[str, dict[str, torch.Tensor]] = {split: {} for split in splits}
        cut = static_cut(strategy, backbone, epochs)
        # Pooled features (cut n) are a few KB a sample; only a prefix's token states or feature maps can outgrow RAM.
        prefix = lambda b, c=cut: backbone.prefix_output(c, b)  # noqa: E731
        if 0 < cut < n and not self.fits(splits, backbone, prefix, "frozen prefix"):
            cut = 0
        if cut:
            for split in splits:
                entry = self.entry(split, backbone, prefix_what(cut, n), prefix)
                self.datamodule.splits[split] = CachedSplit(entry, self.datamodule.splits[split])
            module.frozen_cut, module.use_frozen = cut, True
        elif probes(strategy, n, epochs) and deterministic(strategy, backbone, n):
            for split in splits:
                entry = self.entry(split, backbone, prefix_what(n, n), lambda b: backbone.prefix_output(n, b))
                attached[split][FROZEN] = entry["values"]
            module.frozen_cut = n
            callbacks.append(FrozenFeatureSwitch(strategy, n))
        for key, model in strategy.frozen_models().items():
            what = {"output": key}
            for split in splits:
                attached[split][key] = self.entry(split, model, what, model)["values"]
        for split, cached in attached.items():
            if cached:
                self.datamodule.splits[split] = WithCached(self.datamodule.splits[split], cached)
        if cut or any(attached.values()):
            self.datamodule.collate_fn = CachedCollate(self.datamodule.collate_fn, [FROZEN, *strategy.frozen_models()])
        return callbacks


def horizon(cfg: RunConfig) -> int:
    """The epochs a run may train: `trainer.max_epochs`, else Lightning's default horizon."""
    max_epochs = cfg.trainer.get("max_epochs")
    return max_epochs if max_epochs is not None and max_epochs > 0 else 1000


def use_cache(
    cfg: RunConfig,
    strategy: Strategy,
    module: TransferModule,
    datamodule: DataModule,
    augmented: bool,
    tracker: MLflowRun,
) -> list[pl.Callback]:
    """A run's hook (after the module is built, before training): cache what its strategy leaves frozen, log the
    cache's hits/misses/bytes/seconds to MLflow as `cache/features/*`, return the callbacks the run needs."""
    if not cfg.cache.enabled:
        return []
    epochs = horizon(cfg)
    features = FeatureCache(cfg.cache, datamodule, cfg.trainer.get("accelerator"))
    callbacks = features.attach(strategy, module, augmented or datamodule.train_augmented, epochs)
    tracker.log_metrics(features.cache.stats.as_metrics(NAMESPACE))
    return callbacks
