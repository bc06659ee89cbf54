import json
import os
import socket
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from apt_env.train.distributed import backend_for, broadcast_int, broadcast_object, init_distributed, is_distributed


def test_backend_for_device():
    # NCCL has no CPU collectives: a GPU run still needs gloo for CPU tensors and objects.
    assert backend_for(use_cuda=True) == "cpu:gloo,cuda:nccl"
    assert backend_for(use_cuda=False) == "gloo"


def test_one_process_needs_no_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    rank, world_size, device = init_distributed("cpu")
    assert (rank, world_size, device.type) == (0, 1, "cpu") and not is_distributed()
    assert broadcast_int(7) == 7 and broadcast_object({"a": 1}) == {"a": 1}


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = "2"
    got_rank, world_size, device = init_distributed("cpu")
    result = {
        "rank": got_rank,
        "world_size": world_size,
        "device": str(device),
        "int": broadcast_int(100 + rank),
        "object": broadcast_object({"run": f"from-rank-{rank}"}),
    }
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_cpu_ranks_broadcast_rank_zero_values(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result == {
            "rank": rank,
            "world_size": 2,
            "device": "cpu",
            "int": 100,
            "object": {"run": "from-rank-0"},
        }
