"""A sasified model trains under DistributedDataParallel (gloo, 2 ranks, launched as torchrun does)."""
import pytest
import os
import socket
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process(tmp_path):
    worker = os.path.join(HERE, "ddp_worker.py")
    single, multi = tmp_path / "single.pt", tmp_path / "ddp.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    subprocess.run([sys.executable, worker, str(single)], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                    f"--master_addr=127.0.0.1", f"--master_port={_free_port()}", worker, str(multi)],
                   check=True, env=env, timeout=300)
    a, b = torch.load(single), torch.load(multi)
    assert a.keys() == b.keys()
    wide = [k for k in a if a[k].dim() == 4 and "weight" in k]
    assert wide
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
