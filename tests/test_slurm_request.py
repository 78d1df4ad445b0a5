"""The SLURM launchers' request check (src/sweep/slurm.py) on the output of a real single-node cluster (fast; the
end-to-end cluster tests are tests/test_cluster.py, slow)."""

from __future__ import annotations

import pytest

from src.sweep.slurm import ClusterError, Request, check_request, gpu_count, parse_nodes

# `scontrol show node --oneliner` of the cluster tests/cluster/setup_slurm.sh starts (2 CPUs, no GPU), plus a GPU node
CPU_NODE = (
    "NodeName=vm Arch=x86_64 CoresPerSocket=2  CPUAlloc=0 CPUEfctv=2 CPUTot=2 CPULoad=15.54 AvailableFeatures=(null) "
    "ActiveFeatures=(null) Gres=(null) NodeAddr=127.0.0.1 NodeHostName=vm Version=22.05.8 OS=Linux 6.18.44-fc-v657 "
    "#1 SMP PREEMPT_DYNAMIC @0  RealMemory=24152 AllocMem=0 FreeMem=8861 Sockets=1 Boards=1 State=IDLE "
    "ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=debug  BootTime=2026-11-30T08:55:08"
)
GPU_NODE = "NodeName=g1 CPUTot=32 Gres=gpu:a100:4(S:0-1) RealMemory=256000 State=MIXED Partitions=gpu,debug"


def test_nodes_are_read_from_scontrol() -> None:
    cpu, gpu = parse_nodes(f"{CPU_NODE}\n{GPU_NODE}\n")
    assert (cpu.name, cpu.cpus, cpu.mem_mb, cpu.gpus, cpu.partitions) == ("vm", 2, 24152, 0, ("debug",))
    assert (gpu.cpus, gpu.gpus, gpu.partitions) == (32, 4, ("gpu", "debug"))
    assert [gpu_count(g) for g in ("gpu:2", "gpu:a100:2(S:0),gpu:v100:1", "(null)", "mps:100")] == [2, 3, 0, 0]


def test_the_gpu_preset_on_a_cpu_node_names_every_key_to_change() -> None:
    gpu_preset = Request.of({"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32, "tasks_per_node": 1})
    with pytest.raises(ClusterError) as e:
        check_request(gpu_preset, parse_nodes(CPU_NODE), ["debug"], "debug")
    message = str(e.value)
    for key in ("gpus_per_node<=0", "cpus_per_task<=2", "mem_gb<=23", "hydra.launcher.partition"):
        assert key in message, message
    cpu_preset = Request.of({"gpus_per_node": None, "cpus_per_task": 1, "mem_gb": 2})
    check_request(cpu_preset, parse_nodes(CPU_NODE), ["debug"], "debug")  # fits: no error


def test_partition_and_multi_node_requests() -> None:
    nodes = parse_nodes(f"{CPU_NODE}\n{GPU_NODE}")
    with pytest.raises(ClusterError, match=r"partition=gpus: no such partition; this cluster has \['debug', 'gpu'\]"):
        check_request(Request.of({"partition": "gpus"}), nodes, ["debug", "gpu"], "debug")
    check_request(Request.of({"partition": "gpu", "gpus_per_node": 4, "cpus_per_task": 8}), nodes, ["gpu"], None)
    with pytest.raises(ClusterError, match=r"hydra.launcher.nodes<=1"):
        check_request(Request.of({"partition": "gpu", "nodes": 2, "gpus_per_node": 1}), nodes, ["gpu"], None)
    with pytest.raises(ClusterError, match="no default"):
        check_request(Request.of({}), nodes, ["debug", "gpu"], None)
