"""The reader under real multi-process gloo groups: every sample once, equal batches on every rank (with a
collective after every batch, as ZeRO-3 does, so an unequal rank would hang), and exact resume."""

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .conftest import REPO


def _rank_main(rank, world_size, port, shards, model_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    from transformers import AutoConfig, AutoTokenizer

    from higgs_ds.models.family import register_auto_classes

    register_auto_classes()

    from higgs_ds.stream.loader import DataConfig, build_dataloader

    tok, config = AutoTokenizer.from_pretrained(model_dir), AutoConfig.from_pretrained(model_dir)
    result = {}
    for workers in (0, 1, 2):
        batch_size = 1 if world_size * workers > 4 else 2  # 8 samples: every worker gets a batch
        cfg = DataConfig(shards=[shards], batch_size=batch_size, num_workers=workers, seed=5)
        ids = []
        for batch in build_dataloader(cfg, tok, config, rank=rank, world_size=world_size):
            ids.append(batch["sample_ids"])
            step = torch.ones(1)
            dist.all_reduce(step)  # a collective per batch: a rank with fewer batches would hang here
        result[workers] = ids
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_sample_once_and_equal_batches_across_ranks(world_size, small_shards, tiny_model_dir):
    """small_shards holds 8 samples in uneven shards (3, 3, 2)."""
    with tempfile.TemporaryDirectory() as out:
        port = 20000 + (os.getpid() * 7 + world_size) % 20000
        ctx = mp.start_processes(
            _rank_main,
            args=(world_size, port, str(small_shards), str(tiny_model_dir), out),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.time() + 240
        while not ctx.join(timeout=5):  # raises if a rank failed
            if time.time() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("reader ranks did not finish: a rank waited in a collective")
        ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world_size)]
    for workers in ("0", "1", "2"):
        per_rank = [r[workers] for r in ranks]
        assert len({len(batches) for batches in per_rank}) == 1, (workers, per_rank)
        seen = [sid for batches in per_rank for batch in batches for sid in batch]
        repeats = (-8) % world_size
        assert len(seen) == 8 + repeats and len(set(seen)) == 8, (workers, seen)
    # the batch sequence does not depend on the number of workers (at equal batch size)
    same_batch_size = ("0", "1", "2") if world_size < 4 else ("0", "1")
    for r in ranks:
        assert all(r[w] == r["0"] for w in same_batch_size)


RESUME_SCRIPT = """
import json, sys
from transformers import AutoConfig, AutoTokenizer
from higgs_ds.models.family import register_auto_classes
register_auto_classes()
from higgs_ds.stream.loader import DataConfig, build_dataloader
shards, model_dir, state = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
workers, n = int(sys.argv[4]), int(sys.argv[5])
tok, config = AutoTokenizer.from_pretrained(model_dir), AutoConfig.from_pretrained(model_dir)
loader = build_dataloader(DataConfig(shards=[shards], batch_size=1, num_workers=workers, seed=9), tok, config,
                          rank=state["rank"], world_size=state["world_size"])
loader.load_state_dict(state)
out = []
for batch in loader:
    out.append(batch["sample_ids"])
    if len(out) == n:
        break
print(json.dumps(out))
"""


@pytest.mark.timeout(300)
def test_resume_in_a_new_process_continues_exactly(small_shards, tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    from higgs_ds.stream.loader import DataConfig, build_dataloader

    tok, config = AutoTokenizer.from_pretrained(tiny_model_dir), AutoConfig.from_pretrained(tiny_model_dir)
    cfg = DataConfig(shards=[str(small_shards)], batch_size=1, num_workers=2, seed=9)
    loader = build_dataloader(cfg, tok, config, rank=1, world_size=2)
    loader.seek(epoch=3)
    uninterrupted = [b["sample_ids"] for b in loader]
    assert len(uninterrupted) == 4 and loader.state_dict()["epoch"] == 4  # a full pass moves to the next epoch

    loader = build_dataloader(cfg, tok, config, rank=1, world_size=2)
    loader.seek(epoch=3)
    it = iter(loader)
    first = [next(it)["sample_ids"]]
    state = loader.state_dict()
    assert state["batches_done"] == 1 and state["epoch"] == 3
    del it
    for workers in (0, 1, 2):  # resume with any number of workers
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                RESUME_SCRIPT,
                str(small_shards),
                str(tiny_model_dir),
                json.dumps(state),
                str(workers),
                "3",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
            timeout=200,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert first + json.loads(run.stdout.splitlines()[-1]) == uninterrupted
