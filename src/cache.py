"""One on-disk, content-addressed cache for everything derived and expensive: pretrained weights, parsed and
tokenised tables, frozen-backbone features.

An entry is a `torch.save`d value under `<root>/<namespace>/<key>.pt` plus a `<key>.json` sidecar holding its size
and SHA-256. Writers write a temp file and rename it (readers never see a partial file) and hold a per-key file
lock while computing, so parallel workers (joblib processes, SLURM jobs on a shared filesystem) racing on an empty
cache compute an entry once and all read the same bytes. A truncated or corrupt entry fails its checksum and is
recomputed with a warning, never used.

Keys are `fingerprint(...)` of everything that determines the value; `file_digest` hashes data files by content
(memoised per path, size and mtime), `path_digest` a file or a whole folder, `state_digest` hashes a model's
weights, so a renamed file or a same-named checkpoint with other weights can never hit the wrong entry.

    python -m src.cache --size              # bytes per namespace under the cache root
    python -m src.cache --clear [features]  # delete one namespace (or everything)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

import torch
from filelock import FileLock

log = logging.getLogger(__name__)

CACHE_ENV = "TRANSFER_LAB_CACHE"
T = TypeVar("T")


def cache_root(configured: str | os.PathLike | None = None) -> Path:
    """`configured`, else `$TRANSFER_LAB_CACHE`, else `~/.cache/transfer-lab` (outside any checkout)."""
    return Path(configured or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "transfer-lab").expanduser()


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value)
    return value


def fingerprint(*parts: Any) -> str:
    """A stable hex key of JSON-able parts (dicts in any key order give the same key)."""
    blob = json.dumps(_canonical(list(parts)), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content; memoised per (path, size, mtime) so a run hashes each file once."""
    p = Path(path).resolve()
    stat = p.stat()
    memo = (str(p), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _FILE_DIGESTS[memo] = h.hexdigest()
    return _FILE_DIGESTS[memo]


def path_digest(path: str | os.PathLike) -> str:
    """Content digest of a file, or of a folder (every file's relative path and content, in sorted order)."""
    p = Path(path)
    if p.is_file():
        return file_digest(p)
    files = sorted(f for f in p.rglob("*") if f.is_file())
    return fingerprint([(str(f.relative_to(p)), file_digest(f)) for f in files])


# Modules whose weights came from a known source (see `remember_weights`): their tensors' versions then, the
# source's key; and each source's digest, hashed once per process.
_SOURCES: WeakKeyDictionary[torch.nn.Module, tuple[tuple[tuple[str, int], ...], str]] = WeakKeyDictionary()
_SOURCE_DIGESTS: dict[str, str] = {}


def _versions(module: torch.nn.Module) -> tuple[tuple[str, int], ...]:
    """Each tensor's in-place version counter: any write (an optimizer step, `load_state_dict`) moves one."""
    return tuple((name, t._version) for name, t in module.state_dict(keep_vars=True).items())


def remember_weights(module: torch.nn.Module, *source: Any) -> None:
    """The module's weights were just loaded from `source` (a weight file's content digest, a hub revision): while
    no tensor is written, they are that source's weights, whose digest this process hashed at most once -- the
    next job of a grid or sweep builds the same backbone and skips hashing 90 MB."""
    _SOURCES[module] = (_versions(module), fingerprint(type(module).__name__, *source))


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes, values): its weights' identity."""
    known = _SOURCES.get(module)
    if known is not None and known[0] == _versions(module):
        if known[1] not in _SOURCE_DIGESTS:
            _SOURCE_DIGESTS[known[1]] = _hash_state(module)
        return _SOURCE_DIGESTS[known[1]]
    return _hash_state(module)


def _hash_state(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 1-d: 0-d tensors (BN step counters) cannot view as bytes
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class CacheStats:
    """What a run got from one namespace: logged to MLflow as `cache/<namespace>/*`."""

    hits: int = 0
    misses: int = 0
    bytes: int = 0
    seconds_computing: float = 0.0

    def as_metrics(self, namespace: str) -> dict[str, float]:
        return {f"cache/{namespace}/{k}": float(v) for k, v in vars(self).items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomically(path: Path, write: Callable[[Any], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class _Warm:
    """Entries already loaded in this process, kept for the next job of a grid or sweep that Hydra's basic launcher
    runs in the same process: a hit then costs a `stat`, not a read and a SHA-256 of the file. Keyed by the entry
    file's path, size and mtime (a rewritten entry is read again), least recently used first out, bounded by the
    entries' size on disk (`cache.warm_gb`; 0 keeps none). Values are shared: callers never modify an entry."""

    def __init__(self) -> None:
        self.budget = 0.0
        self.entries: OrderedDict[str, tuple[tuple[int, int], int, Any]] = OrderedDict()

    def get(self, path: Path) -> tuple[Any, int] | None:
        """The entry loaded from `path` and its size, while the file is the one it was loaded from."""
        found = self.entries.get(str(path))
        if found is None:
            return None
        stat = path.stat()
        if found[0] != (stat.st_size, stat.st_mtime_ns):
            del self.entries[str(path)]
            return None
        self.entries.move_to_end(str(path))
        return found[2], found[1]

    def put(self, path: Path, size: int, value: Any) -> None:
        if size > self.budget:
            return
        stat = path.stat()
        self.entries[str(path)] = ((stat.st_size, stat.st_mtime_ns), size, value)
        self.trim()

    def trim(self) -> None:
        """Drop the least recently used entries until the rest fit the budget."""
        while self.entries and sum(e[1] for e in self.entries.values()) > self.budget:
            self.entries.popitem(last=False)


WARM = _Warm()


def keep_warm(gb: float) -> None:
    """Set how much this process keeps of the entries it loaded (a run's `cache.warm_gb`)."""
    WARM.budget = gb * 1e9
    WARM.trim()


class Cache:
    """The entries of one namespace (e.g. `features`, `tokenized`, `small_cnn`) under a cache root."""

    def __init__(self, namespace: str, root: str | os.PathLike | None = None) -> None:
        self.namespace = namespace
        self.dir = cache_root(root) / namespace
        self.stats = CacheStats()

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.dir / f"{key}.pt", self.dir / f"{key}.json"

    def contains(self, key: str) -> bool:
        data, meta = self._paths(key)
        return data.exists() and meta.exists()

    def load(self, key: str) -> Any | None:
        """The entry, or None when absent; a corrupt entry is removed with a warning and reported absent."""
        data, meta = self._paths(key)
        if not (data.exists() and meta.exists()):
            return None
        warm = WARM.get(data)
        if warm is not None:
            value, size = warm
            self.stats.bytes += size
            return value
        try:
            info = json.loads(meta.read_text())
            if data.stat().st_size != info["size"] or _sha256(data) != info["sha256"]:
                raise ValueError(f"size/checksum mismatch (expected {info['size']} bytes)")
            value = torch.load(data, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any damage means: do not use, recompute
            log.warning("cache: entry %s is corrupt (%s); recomputing it", data, e)
            for p in (meta, data):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            return None
        self.stats.bytes += info["size"]
        WARM.put(data, info["size"], value)
        return value

    def save(self, key: str, value: Any) -> int:
        """Write the entry atomically (data first, then the sidecar that makes it valid); returns its size."""
        data, meta = self._paths(key)
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(data, lambda f: torch.save(value, f))
        info = {"size": data.stat().st_size, "sha256": _sha256(data), "created": time.time()}
        _write_atomically(meta, lambda f: f.write(json.dumps(info).encode()))
        return info["size"]

    def get_or_compute(self, key: str, compute: Callable[[], T]) -> T:
        """The cached value for `key`, computing and storing it on a miss. Workers racing on the same key wait on
        one lock, so the value is computed once and everyone loads the same bytes."""
        value = self.load(key)
        if value is not None:
            self.stats.hits += 1
            return value
        self.dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self._paths(key)[0]) + ".lock"):
            value = self.load(key)  # another worker may have finished it while we waited
            if value is not None:
                self.stats.hits += 1
                return value
            start = time.perf_counter()
            value = compute()
            self.stats.seconds_computing += time.perf_counter() - start
            self.stats.bytes += self.save(key, value)
            self.stats.misses += 1
            return value

    def size(self) -> int:
        """Bytes on disk in this namespace."""
        return sum(p.stat().st_size for p in self.dir.glob("*") if p.is_file()) if self.dir.exists() else 0

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.cache", description="Size or clear the on-disk cache.")
    parser.add_argument("--dir", help=f"cache root (default: ${CACHE_ENV} or ~/.cache/transfer-lab)")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--size", action="store_true", help="print the bytes each namespace holds")
    action.add_argument("--clear", nargs="?", const="", metavar="NAMESPACE", help="delete a namespace, or all")
    args = parser.parse_args(argv)
    root = cache_root(args.dir)
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []
    if args.clear is not None:
        for name in [args.clear] if args.clear else names:
            Cache(name, root).clear()
        print(f"cleared {args.clear or 'all namespaces'} under {root}")
        return
    sizes = {name: Cache(name, root).size() for name in names}
    for name, size in sizes.items():
        print(f"{name:<12} {_human(size):>10}  {root / name}")
    print(f"{'total':<12} {_human(sum(sizes.values())):>10}  {root}")


if __name__ == "__main__":
    main()
