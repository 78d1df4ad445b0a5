"""The shared on-disk cache: keys, atomic writes, racing workers, corrupt entries."""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch

from src.cache import Cache, file_digest, fingerprint, keep_warm, remember_weights, state_digest
from src.config import CacheConfig


def test_fingerprint_is_order_free_and_sensitive_to_every_part() -> None:
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint({"a": 1}, "x") != fingerprint({"a": 1}, "y")


def test_file_digest_follows_content_not_name(tmp_path: Path) -> None:
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    a.write_text("x\t0\n")
    b.write_text("x\t0\n")
    assert file_digest(a) == file_digest(b)
    before = file_digest(a)
    time.sleep(0.01)
    a.write_text("x\t1\n")
    assert file_digest(a) != before


def test_state_digest_changes_with_any_weight() -> None:
    net = torch.nn.Linear(3, 2)
    before = state_digest(net)
    assert state_digest(net) == before
    with torch.no_grad():
        net.bias[0] += 1e-6
    assert state_digest(net) != before


def test_get_or_compute_hits_after_first_miss(tmp_path: Path) -> None:
    calls = []
    cache = Cache("things", tmp_path)

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"x": torch.arange(5)}

    first = cache.get_or_compute("k", compute)
    again = Cache("things", tmp_path).get_or_compute("k", compute)
    assert torch.equal(first["x"], again["x"]) and len(calls) == 1
    assert (cache.stats.misses, cache.stats.hits) == (1, 0)
    assert cache.size() > 0
    cache.clear()
    assert cache.size() == 0 and not cache.contains("k")


def test_truncated_entry_is_detected_and_recomputed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache("things", tmp_path)
    cache.get_or_compute("k", lambda: {"x": torch.randn(1000)})
    data = tmp_path / "things" / "k.pt"
    data.write_bytes(data.read_bytes()[:100])  # a worker died mid-copy, a disk filled up
    with caplog.at_level(logging.WARNING):
        value = Cache("things", tmp_path).get_or_compute("k", lambda: {"x": torch.zeros(3)})
    assert "corrupt" in caplog.text
    assert torch.equal(value["x"], torch.zeros(3))


def _race(root: str, out: str) -> None:
    def compute() -> dict[str, torch.Tensor]:
        time.sleep(0.5)  # both processes miss and race for the lock
        return {"x": torch.randn(100)}

    torch.save(Cache("race", root).get_or_compute("k", compute), out)


def test_two_processes_racing_on_an_empty_cache_get_identical_values(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"out{i}.pt" for i in range(2)]
    procs = [ctx.Process(target=_race, args=(str(tmp_path), str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    a, b = (torch.load(o, weights_only=True)["x"] for o in outs)
    assert torch.equal(a, b)
    assert [p.name for p in (tmp_path / "race").glob("*.pt")] == ["k.pt"]


def test_a_process_keeps_loaded_entries_warm_until_the_file_changes(tmp_path: Path) -> None:
    """`cache.warm_gb`: the next job of a grid gets the entry this process already loaded (the same object), until
    the entry's file is rewritten; a budget of 0 keeps nothing."""
    cache = Cache("ns", tmp_path)
    cache.save("k", {"x": torch.arange(4)})
    try:
        keep_warm(1.0)
        first, again = cache.load("k"), cache.load("k")
        assert again is first and torch.equal(first["x"], torch.arange(4))
        time.sleep(0.01)
        cache.save("k", {"x": torch.arange(5)})  # rewritten: new size and mtime
        assert torch.equal(cache.load("k")["x"], torch.arange(5))
        keep_warm(0)
        assert cache.load("k") is not cache.load("k")
    finally:
        keep_warm(CacheConfig.warm_gb)


def test_weights_from_a_known_source_are_hashed_once_per_process() -> None:
    """`remember_weights`: the second backbone built from the same source gets the digest the first one hashed
    (a module that is not those weights would reveal it: its own hash differs); a write to a tensor (a step,
    `load_state_dict` of `finetune.init_from`) makes the digest that of the values again."""
    first, second, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    second.load_state_dict(first.state_dict())
    remember_weights(first, "weights.safetensors digest")
    digest = state_digest(first)
    assert digest == state_digest(second)
    remember_weights(other, "weights.safetensors digest")  # a stand-in: the source's digest, not its own hash
    assert state_digest(other) == digest
    with torch.no_grad():
        other.weight.add_(1.0)
    assert state_digest(other) != digest
    other.load_state_dict(first.state_dict())
    assert state_digest(other) == digest
