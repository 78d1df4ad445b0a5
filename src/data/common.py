"""What every data module shares: base config fields, seeded sampling/splitting, and the loaders.

Keeping these in one place means "seeded subset", "stratified split" and "how batches are loaded" mean
the same thing for every dataset, so runs are comparable across data modules.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from src.cache import path_digest
from src.data.config import DataConfig, EvalSetConfig
from src.data.corruptions import CORRUPTION_VERSION, corrupt
from src.data.text_noise import TEXT_NOISE_VERSION
from src.schema import ConfigError, blame
from src.tasks.base import labels_digest

if TYPE_CHECKING:  # runtime import would cycle: backbones (small_cnn) import src.data.digits
    from src.backbones.base import Preprocessing
    from src.config import CVConfig
    from src.tasks.base import Task


def seeded_subset(n: int, k: int | None, seed: int) -> np.ndarray:
    """Sorted indices of ``k`` of ``n`` items drawn with ``seed`` (all of them when ``k`` is None or >= n)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def stratified_split(labels: Sequence[Hashable], sizes: Callable[[int], Sequence[int]], seed: int) -> list[np.ndarray]:
    """Seeded per-class split of indices: ``sizes(n_class)`` gives the leading parts, the rest is the last.

    ``lambda n: [round(0.1 * n)]`` -> ``[val, train]``; ``lambda n: [10, 20]`` -> ``[train, val, rest]``.
    Parts are sorted, so batches follow file order until the train loader shuffles.
    """
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    if labels_arr.size == 0:
        raise ValueError("cannot split an empty dataset")
    per_class = []
    for label in sorted(set(labels_arr.tolist()), key=str):
        members = rng.permutation(np.flatnonzero(labels_arr == label))
        bounds = np.cumsum(list(sizes(len(members))))
        if bounds[-1] > len(members):
            raise ValueError(f"class {label!r} has {len(members)} samples, needs at least {bounds[-1]}")
        per_class.append(np.split(members, bounds))
    return [np.sort(np.concatenate(part)) for part in zip(*per_class, strict=True)]


def fraction_split(labels: Sequence[Hashable], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified ``(train, val)`` indices; every class with >= 2 samples keeps >= 1 on each side."""
    val, train = stratified_split(labels, lambda n: [min(max(round(n * fraction), 1), n - 1)], seed)
    return train, val


def fold_split(labels: Sequence[Hashable], folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified ``(train, val)`` indices for fold ``fold`` of ``folds``: each stratum is permuted once
    (the same for every fold) and dealt into near-equal parts, so the folds are disjoint, cover the data and keep
    every stratum's share."""
    labels_arr = np.asarray(labels)
    smallest = min(int((labels_arr == label).sum()) for label in set(labels_arr.tolist()))
    if smallest < folds:
        raise ConfigError(
            f"cv.folds: {folds} folds, but the training data's smallest stratum (a class, rarest tag or target bin) "
            f"has only {smallest} example(s); every fold needs one of each: use cv.folds <= {smallest}"
        )

    def sizes(n: int) -> list[int]:
        return [n // folds + (i < n % folds) for i in range(folds - 1)]

    parts = stratified_split(labels, sizes, seed)
    val = parts[fold]
    return np.setdiff1d(np.arange(len(labels_arr)), val), val


# Evaluation batch size over cached pooled features: the same outputs in fewer steps (each costs Lightning ~1 ms).
POOLED_EVAL_BATCH = 1024


def lengths_of(dataset: Dataset) -> np.ndarray | None:
    """Each item's token count where items are token sequences (a dataset with ``lengths()``), else None."""
    lengths = getattr(dataset, "lengths", None)
    return None if lengths is None else np.asarray(lengths())


def shuffled_batches(order: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[int]:
    """`order` cut into batches, the full ones shuffled and the short one last (the loader cuts the same batches)."""
    full = len(order) - len(order) % batch_size
    batches = order[:full].reshape(-1, batch_size)[rng.permutation(full // batch_size)]
    return [*batches.ravel().tolist(), *order[full:].tolist()]


class LengthOrder(Sampler[int]):
    """Evaluation in batches of similar length: each batch pads to a near-equal length (SST-2 dev: 25 tokens a
    sentence, 45 padded in file order). The batches come in a fixed shuffled order, not longest first, so a partial
    pass (`trainer.limit_val_batches`) still sees every length. Metrics are order-free; every consumer pairs
    outputs with the labels of the same batch."""

    def __init__(self, lengths: np.ndarray, batch_size: int) -> None:
        self.order = shuffled_batches(np.argsort(-lengths, kind="stable"), batch_size, np.random.default_rng(0))

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)


class LengthGroupedSampler(Sampler[int]):
    """Training batches of similar length (`data.group_by_length`): each epoch sorts the items by length plus
    uniform noise of one standard deviation of the lengths, cuts that order into batches at a random offset and
    shuffles the batches. Batches differ every epoch, as with plain shuffling, but pad far less (SST-2 training
    sentences: 13 tokens each, 35 padded in random batches of 16, about 17 grouped). The order is drawn from
    (seed, epoch): DDP ranks agree on it, and a resumed run (Lightning sets the epoch) draws what an uninterrupted
    one would."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch = lengths.astype(np.float64), batch_size, seed, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1  # the next pass differs where nothing sets the epoch (a DDP wrapper, a plain loop)
        n = len(self.lengths)
        order = np.roll(np.argsort(self.lengths + rng.uniform(0, self.lengths.std(), n)), rng.integers(n or 1))
        return iter(shuffled_batches(order, self.batch_size, rng))


class Unlabelled(Dataset):
    """A dataset's items without their labels: all that domain adaptation may see of the target domain."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {k: v for k, v in self.dataset[index].items() if k != "labels"}


# Split names of the named evaluation sets (`data.eval_sets`): EVAL_PREFIX + the set's name.
EVAL_PREFIX = "eval/"
EVAL_SET_KEYS = ("eval_sets", "eval_sets_every_val")  # config keys that change no other split's samples
# An image shift of an evaluation set: (C, H, W) pixels in [0, 1] and the image's own seeded generator -> pixels.
PixelShift = Callable[[torch.Tensor, np.random.Generator], torch.Tensor]


def corruption(name: str, severity: int) -> PixelShift:
    """The ImageNet-C corruption `name` at `severity` as a pixel shift (src.data.corruptions works in HWC numpy)."""

    def shift(pixels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        image = pixels.permute(1, 2, 0).numpy()
        return torch.from_numpy(corrupt(image, name, severity, rng)).permute(2, 0, 1)

    return shift


class ShiftedImages(Dataset):
    """An image split shifted before its transform (normalisation): an evaluation set made from config. Each
    image's randomness comes from its own generator, seeded with ``(seed, index)``, so the set is the same pixels in
    every run and in any access order. The base split provides ``pixels(index)``, ``transform`` and ``labels``."""

    def __init__(self, base: Any, shift: PixelShift, seed: int) -> None:
        self.base, self.shift, self.seed = base, shift, seed
        self.labels = base.labels

    def __len__(self) -> int:
        return len(self.base)

    def pixels(self, index: int) -> torch.Tensor:
        return self.shift(self.base.pixels(index), np.random.default_rng([self.seed, index]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.base.transform(self.pixels(index)), "labels": self.labels[index]}

    def check_visible(self, key: str, sample: int = 16) -> None:
        """Refuse a shift that changes no pixel of the first `sample` images by one 8-bit grey level: a blur whose
        224 px radius scales to a fraction of a pixel on small images (digits) would be a silent copy of test."""
        change = max(float((self.pixels(i) - self.base.pixels(i)).abs().max()) for i in range(min(sample, len(self))))
        if change < 1 / 255:
            size = "x".join(str(n) for n in self.base.pixels(0).shape[-2:])
            raise ConfigError(
                f"{key}: changes no pixel of these {size} px images by one grey level (ImageNet-C's spatial "
                "parameters are scaled to the image size); choose a higher severity or another corruption"
            )


def tested_split(splits: dict[str, Any]) -> str:
    """The split `trainer.test` scores: the test split when the dataset has one, else the validation split."""
    return "test" if "test" in splits else "val"


# What the target domain is used for (set by the adaptation method, see src/adapt): "eval" = evaluation only,
# "adapt" = unlabelled target batches beside the labelled source batches, "oracle" = supervised training on the
# labelled target images (the upper bound).
TARGET_ROLES = ("eval", "adapt", "oracle")


def source_loader(loader: Any) -> Any:
    """The labelled source loader of what `train_dataloader` returns (a dict of loaders when adapting)."""
    return loader["source"] if isinstance(loader, dict) else loader


class DataModule(pl.LightningDataModule):
    """Loaders and setup bookkeeping; subclasses implement ``_build`` to produce the splits and output names.

    The run's task turns label cells into targets (class indices, tag rows, numbers) and says how to stratify;
    ``setup`` is idempotent (Lightning calls it again after the user did), and ``names`` (classes, tags or
    target columns), ``label_mapping`` and the bound task are valid once it has run.

    A target domain (domain adaptation) is two more splits: ``target_train`` (items may carry labels, which only
    an oracle run trains on) and optionally ``target_test`` (labelled, evaluation only); ``target_role`` says
    what training uses of them.
    """

    modality: str  # the Preprocessing.modality this data module can feed
    # How samples are batched and stored, not what they are: left out of `identity`.
    NOT_SAMPLES = ("batch_size", "eval_batch_size", "num_workers", "group_by_length", "cache", "cache_dir")

    def __init__(
        self, cfg: DataConfig, preprocessing: Preprocessing, seed: int, task: Task, cv: CVConfig | None = None
    ) -> None:
        if preprocessing.modality != self.modality:
            raise ValueError(
                f"data '{cfg.name}' produces {self.modality} inputs but the backbone expects "
                f"{preprocessing.modality} inputs"
            )
        super().__init__()
        self.cfg = cfg
        self.preprocessing = preprocessing
        self.seed = seed
        self.task = task
        self.cv = cv if cv is not None and cv.folds is not None else None
        self.names: list[str] = []
        self.label_mapping: dict[str, int] = {}
        self._splits: dict[str, Dataset] = {}
        self.collate_fn: Callable[[list[Any]], Any] | None = None  # None: torch's default_collate
        self.target_role = "eval"  # one of TARGET_ROLES

    def _build(self) -> tuple[dict[str, Dataset], list[str]]:  # pragma: no cover - abstract
        """Return ``{"train", "val"[, "test"][, "target_train"[, "target_test"]]}`` datasets (each with its
        ``labels``: the task's targets) and the output names.

        The train split must already be restricted to ``train_indices`` (done by the subclass, before any
        per-sample work such as tokenisation).
        """
        raise NotImplementedError

    @property
    def groups_by_length(self) -> bool:
        """Whether training batches group items of similar length (text: `data.group_by_length`)."""
        return False

    @property
    def train_augmented(self) -> bool:
        """Whether the training split draws random transforms per sample (then its samples differ every epoch)."""
        return False

    def identity(self) -> dict[str, Any]:
        """What determines every split's samples, for cache keys (call after `setup`): the config without loader
        and cache knobs, the content digest of every file or folder it names, the class names, each split's labels
        and the seed (subsets, splits)."""
        # Evaluation sets are keyed each on its own (`split_identity`): adding one leaves the other splits' keys.
        fields = {k: v for k, v in asdict(self.cfg).items() if k not in (*self.NOT_SAMPLES, *EVAL_SET_KEYS)}
        files = {k: path_digest(v) for k, v in fields.items() if isinstance(v, str) and Path(v).exists()}
        labels = {
            split: labels_digest(np.asarray(data.labels))
            for split, data in self._splits.items()
            if getattr(data, "labels", None) is not None  # unlabelled target tables have none
            and not split.startswith(EVAL_PREFIX)
        }
        return {
            "module": type(self).__name__,
            "config": fields,
            "files": files,
            "task": self.task.name,
            "classes": self.names,
            "labels": labels,
            "seed": self.seed,
            **({} if self.cv is None else {"cv": [self.cv.folds, self.cv.fold]}),  # absent: old keys stay valid
        }

    def split_identity(self, split: str) -> Any:
        """What a split's samples depend on beyond `identity()`, for cache keys: its name, or for an evaluation
        set its spec (not its name: the same set under another name hits the same entry), its labels and the
        content of the file it reads, or the test split it shifts."""
        if not split.startswith(EVAL_PREFIX):
            return split
        spec = self.cfg.eval_sets[split.removeprefix(EVAL_PREFIX)]
        source = {"files": path_digest(spec.path)} if spec.path is not None else {"shifts": tested_split(self._splits)}
        labels = labels_digest(np.asarray(self._splits[split].labels))
        versions = {"corruptions": CORRUPTION_VERSION, "text_noise": TEXT_NOISE_VERSION}
        return {"eval_set": asdict(spec), "labels": labels, "versions": versions, **source}

    def eval_splits(
        self,
        splits: dict[str, Dataset],
        labelled: Callable[[str, str, str], Dataset] | None = None,
        shifted: Callable[[str, EvalSetConfig, Dataset], Dataset] | None = None,
    ) -> dict[str, Dataset]:
        """The named evaluation sets (`data.eval_sets`) by split name (EVAL_PREFIX + name), for `_build`: what
        ``labelled(name, key, path)`` reads from a file or folder in the training format, with the training data's
        label mapping (unknown labels are refused), or a shift of the split tested (``splits``' test, else val):
        ``shifted(name, spec, tested)``, by default its images shifted by `pixel_shift`."""
        tested = splits[tested_split(splits)]
        out: dict[str, Dataset] = {}
        for name, spec in self.cfg.eval_sets.items():
            if spec.path is not None and labelled is not None:
                out[EVAL_PREFIX + name] = labelled(name, f"data.eval_sets.{name}.path", spec.path)
            elif shifted is not None:
                out[EVAL_PREFIX + name] = shifted(name, spec, tested)
            else:
                out[EVAL_PREFIX + name] = images = ShiftedImages(tested, self.pixel_shift(spec), spec.seed)
                images.check_visible(f"data.eval_sets.{name}")
        return out

    def pixel_shift(self, spec: EvalSetConfig) -> PixelShift:
        """The image shift an evaluation set applies (config validation admits only the kinds a module makes)."""
        if spec.corruption is None or spec.severity is None:
            raise ConfigError(f"data ({self.cfg.name}): cannot make a {spec.kind()} evaluation set")
        return corruption(spec.corruption, spec.severity)

    @property
    def splits(self) -> dict[str, Dataset]:
        """The datasets by split name (after `setup`); the feature cache replaces or wraps them."""
        return self._splits

    def val_split(self, strata: Sequence[Hashable], fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """``(train, val)`` indices into the training data (given by its strata), train already subset by
        ``train_indices``. Cross-validating, the folds are cut from the subset (k-fold on 64 examples per class
        validates on a fifth of those, not of the whole table); otherwise validation is a seeded stratified
        ``fraction`` of the whole table, fixed while the training subset varies (learning curves)."""
        labels = np.asarray(strata)
        if self.cv is not None:
            pool = self.train_indices(labels)
            train, val = fold_split(labels[pool], self.cv.folds, self.cv.fold, self.seed)
            return pool[train], pool[val]
        train, val = fraction_split(labels, fraction, self.seed)
        return train[self.train_indices(labels[train])], val

    def train_indices(self, labels: Sequence[Hashable]) -> np.ndarray:
        """Indices into a training split (given by its strata: classes, rarest tags, target bins) of its seeded
        subset: at most ``max_train_per_class`` examples of each stratum, then ``max_train_samples`` in all."""
        keep = np.arange(len(labels))
        if self.cfg.max_train_per_class is not None:
            cap = self.cfg.max_train_per_class
            keep = stratified_split(labels, lambda n: [min(cap, n)], self.seed)[0]
        n = len(keep)
        if self.cfg.max_train_samples is not None and self.cfg.max_train_samples > n:
            raise ConfigError(
                f"data.max_train_samples: {self.cfg.max_train_samples} asked, but the training split has only {n} "
                "examples; lower it or set it to null (all)"
            )
        return keep[seeded_subset(n, self.cfg.max_train_samples, self.seed)]

    def setup(self, stage: str | None = None) -> None:
        """Builds the splits once, and refuses data the task cannot learn from before any compute; binds the task
        (its output names, and what it learns from the training targets)."""
        if self._splits:
            return
        try:
            with blame(f"data ({self.cfg.name})"):
                splits, names = self._build()
        except ConfigError as e:  # readers name their key (train_path: ...); the user knows it as data.<key>
            raise ConfigError(str(e) if str(e).startswith(("data", "cv.")) else f"data.{e}") from e
        for split, dataset in splits.items():
            if len(dataset) == 0:
                raise ConfigError(f"data ({self.cfg.name}): the {split} split is empty")
        self.task.bind(names, None)
        self.task.check_train(np.asarray(splits["train"].labels), f"data ({self.cfg.name})")
        self.task.bind(names, np.asarray(splits["train"].labels))
        self.names = names
        self.label_mapping = {name: i for i, name in enumerate(names)}
        self._splits = splits

    @property
    def has_target(self) -> bool:
        return "target_train" in self._splits

    def _split(self, split: str) -> Dataset:
        if not self._splits:
            raise RuntimeError(f"{type(self).__name__}: call setup() before requesting dataloaders")
        return self._splits[split]

    def _loader(self, dataset: Dataset, train: bool = False, num_samples: int | None = None) -> DataLoader:
        """`num_samples`: draw that many training items (cycling through the dataset) instead of one pass."""
        batch_size = self.cfg.batch_size if train else (self.cfg.eval_batch_size or self.cfg.batch_size)
        if not train and getattr(dataset, "pooled", False):  # cached features: the head alone, row by row
            batch_size = max(batch_size, POOLED_EVAL_BATCH)
        lengths = lengths_of(dataset)
        sampler: Sampler[int] | None = None
        if num_samples is not None:
            sampler = RandomSampler(dataset, num_samples=num_samples)
        elif train and lengths is not None and self.groups_by_length:
            sampler = LengthGroupedSampler(lengths, batch_size, self.seed)
        elif not train and lengths is not None:
            sampler = LengthOrder(lengths, batch_size)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    def train_dataloader(self) -> DataLoader | dict[str, DataLoader]:
        """The labelled source batches; when adapting, a dict that adds as many unlabelled target batches
        (``{"source": ..., "target": ...}``, which Lightning zips); in an oracle run the labelled target batches."""
        if self.target_role not in TARGET_ROLES:
            raise ValueError(f"target_role: must be one of {', '.join(TARGET_ROLES)}; got {self.target_role!r}")
        if self.target_role != "eval" and not self.has_target:
            raise ValueError(f"data '{self.cfg.name}': target_role={self.target_role!r} needs a target domain")
        if self.target_role == "oracle":
            target = self._split("target_train")
            if "labels" not in target[0]:
                raise ValueError(f"data '{self.cfg.name}': adapt=oracle trains on target labels, the target has none")
            return self._loader(target, train=True)
        source = self._loader(self._split("train"), train=True)
        if self.target_role == "eval":
            return source
        target = Unlabelled(self._split("target_train"))
        return {"source": source, "target": self._loader(target, True, len(source) * self.cfg.batch_size)}

    def target_dataloaders(self) -> dict[str, DataLoader]:
        """Evaluation loaders of the target domain: ``unlabelled`` (the target training images without labels,
        for label-free model selection) and ``test`` (labelled, for target metrics) when there is one."""
        out = {"unlabelled": self._loader(Unlabelled(self._split("target_train")))}
        if "target_test" in self._splits:
            out["test"] = self._loader(self._split("target_test"))
        return out

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._split("val"))

    def test_dataloader(self) -> DataLoader:
        """The test split when the dataset has one, else the validation split."""
        return self._loader(self._split(tested_split(self._splits)))

    def eval_dataloaders(self) -> dict[str, DataLoader]:
        """A loader per named evaluation set, by its name."""
        return {
            split.removeprefix(EVAL_PREFIX): self._loader(data)
            for split, data in self._splits.items()
            if split.startswith(EVAL_PREFIX)
        }
