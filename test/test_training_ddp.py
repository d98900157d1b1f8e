"""Two training processes (gloo, CPU) under DistributedDataParallel end with identical weights."""

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp
from test_training_run import TINY

from tdnet_ros.training.config import from_dict


def _worker(rank: int, world: int, out_dir: str, cache: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    from tdnet_ros.training.trainer import train

    config = from_dict(TINY).replace(data={"cache_dir": cache}, run={"out_dir": out_dir, "device": "cpu"})
    result = train(config)
    torch.save({k: v.detach().cpu() for k, v in result.model.state_dict().items()}, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_processes_end_with_identical_weights(tmp_path):
    cache = tmp_path / "cache"
    # Render the sequences once before the processes start (they would both write the cache).
    from tdnet_ros.training.datasets import GeneratedClips

    d = from_dict(TINY).data
    for seeds, frames in ((d.train_seeds, d.frames), (d.val_seeds, d.val_frames)):
        GeneratedClips(seeds, frames, d.size, 4, d.gaps, cache)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, str(tmp_path), str(cache), port), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "model.pt").is_file()
