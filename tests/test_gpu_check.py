"""`tests.gpu_check` on CPU: the no-CUDA answer, and every section of `--cpu-dry-run` on tiny slices of the real
data sets, so the GPU check's own logic is known to work before a GPU machine runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests import gpu_check
from tests.conftest import shared


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the plain command runs the whole check")
def test_without_cuda_it_says_so_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main([]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == gpu_check.NO_CUDA
    assert json.loads(lines[-1])["cuda"] is False


@pytest.mark.slow
def test_cpu_dry_run_runs_every_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shared("sst2"), shared("hymenoptera")
    out = tmp_path / "gpu.json"
    gpu_check.main(["--cpu-dry-run", "--out", str(out)])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures == json.loads(out.read_text()) and figures["mode"] == "cpu-dry-run"
    sections = figures["sections"]
    for entry in sections["throughput"]:
        assert entry["ok"], entry
        assert entry["plain_samples_per_s"] > 0 and entry["framework_samples_per_s"] > 0 and entry["ratio"] > 0
    assert {e["backbone"] for e in sections["throughput"]} == {"minilm", "efficientnet_lite0"}
    assert sections["feature_cache"]["ok"] and sections["feature_cache"]["hits"] > 0, sections["feature_cache"]
    assert sections["lora"]["ok"] and sections["lora"]["trainable_params"] > 0, sections["lora"]
    assert sections["serving"]["ok"] and len(sections["serving"]["text"]["labels"]) == 2, sections["serving"]
    ddp = sections["ddp"]
    assert ddp["ok"], ddp
    assert ddp["trainable_params"] == sorted(set(ddp["trainable_params"])) and len(ddp["trainable_params"]) == 2, ddp
