"""Dataloader workers share the epoch plan, they do not copy it (issue #12, scale).

A rank's plan for a million samples is tens of MB of numpy arrays (higgs_ds.stream.plan: `Batches`,
`References`); it is computed once in the rank before the workers fork, so each worker reads the rank's
pages. A plan held as Python lists (a worker touching an object's refcount or GC header copies its page), a
plan converted or recomputed in each worker, would cost every worker about the plan again.

The shard set is real and readable: one shard of 1,000 generated samples (ShardWriter, token ids stored as
`shards build --tokenizer` stores them), hard-linked 1,000 times under the names of an index written by
write_index (sidecar included), so the workers read, encode and collate their first batches for real. The
measure is each worker's private memory (USS: pages no other process maps) after its first batches and a
full garbage collection, for that 1M-sample set against the same loader over the single shard (1,000
samples: the same samples, a plan a thousandth the size): the difference must stay well below what one copy
of the plan's (shard, sample) pairs costs. Measured: < 1.2 MB more for 1M samples (16 MB of pairs, 36 MB
of plan arrays); a plan recomputed per worker costs ~185 MB more, Python lists made in the worker ~140 MB,
Python lists made in the rank before the fork ~83 MB.
"""

import gc
import os
import time

import numpy as np
import psutil
import pytest

from higgs_ds.models.interface import make_collator
from higgs_ds.stream.loader import DataConfig, EpochDataLoader, ShardStream

PER_SHARD = 1000
COPIES = 1000  # hard links of the one shard: 1,000,000 samples
WORKERS = 2
# fixed-size batches keep a worker's first batches in one shard (budget batches come in a shuffled order and
# would open a member table per batch: private memory of its own); references make the plan's other arrays
SETTINGS = {"batch_size": 4, "clone_references": 0.5, "seed": 1}
CODEC = {"num_codebooks": 8, "codebook_size": 1024, "frame_rate": 25, "sample_rate": 24000, "hop_length": 960}


@pytest.fixture(scope="module")
def tok_config(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoConfig.from_pretrained(tiny_model_dir)


def _samples(tok, out_dir) -> dict:
    """One shard of PER_SHARD plain TTS samples (20 speakers, 0.4-2 s), as the builder writes them."""
    from higgs_ds.shards.writer import ShardWriter
    from higgs_ds.stream.tokens import chatml_tokens, clone_parts, expanded_length

    rng = np.random.RandomState(0)
    words = "the quick brown fox jumps over a lazy dog while seven birds sing".split()
    header = tok.convert_tokens_to_ids("<|start_header_id|>")
    writer = ShardWriter(out_dir, max_samples=PER_SHARD)
    for i in range(PER_SHARD):
        frames = int(rng.randint(10, 50))
        chatml = {
            "messages": [
                {"role": "system", "content": "Generate audio following instruction."},
                {"role": "user", "content": " ".join(rng.choice(words, size=int(rng.randint(3, 9))))},
                {"role": "assistant", "content": {"type": "audio", "audio_url": f"a/{i}.flac"}},
            ],
            "speaker": f"spk{i % 20}",
        }
        input_ids, label_ids, _ = chatml_tokens(chatml, tok)
        record = dict(chatml, id=f"s{i}", audio=[{"url": f"a/{i}.flac", "frames": frames, "seconds": frames / 25}])
        record.update(target_frames=frames, input_ids=input_ids, label_ids=label_ids)
        record.update(expanded_length=expanded_length(len(input_ids), [frames]))
        record.update(clone_parts=clone_parts(input_ids, [frames], header))
        writer.write(f"{i:09d}", record, rng.randint(0, 1024, size=(8, frames)).astype(np.uint16), frames / 25)
    (entry,) = writer.close()
    return entry


def _index(directory, entries: list[dict], tok) -> None:
    from higgs_ds.shards.writer import write_index
    from higgs_ds.stream.tokens import tokenizer_fingerprint

    write_index(directory / "index.json", entries, CODEC, {"tokenizer_fingerprint": tokenizer_fingerprint(tok)})


def make_shard_sets(small, big, tok) -> None:
    """`small`: one real shard and its index; `big`: that shard hard-linked COPIES times, with its index."""
    entry = _samples(tok, small)
    entries = []
    for k in range(COPIES):
        name = f"shard-{k:06d}.tar"
        os.link(small / entry["file"], big / name)
        # the copy's own speakers: a reference comes from the same copy, as in the single shard
        speakers = [f"{speaker}/{k}" for speaker in entry["speakers"]]
        entries.append(dict(entry, file=name, speakers=speakers, clone_parts=list(entry["clone_parts"])))
    _index(small, [entry], tok)
    _index(big, entries, tok)


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory, tok_config):
    small, big = tmp_path_factory.mktemp("one-shard"), tmp_path_factory.mktemp("million")
    make_shard_sets(small, big, tok_config[0])
    return small, big


def plan_bytes(plan) -> int:
    """The least any copy of the plan's batches costs: two int64 (shard, sample) per sample it holds (the
    arrays hold more: batch starts, lengths, references)."""
    return 2 * 8 * SETTINGS["batch_size"] * len(plan.batches)


class CollectedFirst:
    """The family's collator, after one full garbage collection in each process that calls it. A worker runs
    one sooner or later (the rank's allocations before the fork count towards it), and it writes to every
    tracked object it walks, so the rank's Python objects reachable at the fork become the worker's private
    pages then: running it first measures what a worker holds for good, and charges a plan kept as Python
    objects whenever the collection would come."""

    def __init__(self, collate):
        self.collate, self.pid = collate, None

    def __call__(self, samples):
        if self.pid != os.getpid():
            self.pid = os.getpid()
            gc.collect()
        return self.collate(samples)


def worker_private_bytes(shards, tok_config) -> tuple[list[int], int]:
    """Each worker's USS once it has delivered its first batches and waits, and plan_bytes of the plan."""
    tok, config = tok_config
    stream = ShardStream(DataConfig(shards=[str(shards)], num_workers=WORKERS, **SETTINGS), tok, rank=0, world_size=1)
    loader = EpochDataLoader(stream, CollectedFirst(make_collator(config, tok)), WORKERS)  # plans, before the fork
    planned = plan_bytes(stream.plan())
    before = {p.pid for p in psutil.Process().children()}
    batches = iter(loader)
    for _ in range(2 * WORKERS):  # two batches from each worker: each has planned (or not), read and collated
        assert next(batches)["input_ids"].shape[0] >= 1
    workers = [p for p in psutil.Process().children() if p.pid not in before]
    assert len(workers) == WORKERS, workers
    time.sleep(0.5)  # the workers finish their prefetched batches and wait for the next index
    private = [w.memory_full_info().uss for w in workers]
    del batches  # torch's iterator stops its workers
    return private, planned


@pytest.mark.timeout(300)
def test_forked_workers_share_the_epoch_plan(shard_sets, tok_config):
    small, big = shard_sets
    base, small_plan = worker_private_bytes(small, tok_config)
    grown, big_plan = worker_private_bytes(big, tok_config)
    assert big_plan >= 16e6 and small_plan <= big_plan / 500  # a million samples planned, against a thousand
    extra = [g - min(base) for g in grown]
    # a copy of the plan in a worker, or a plan recomputed there, costs at least big_plan per worker
    assert max(extra) < big_plan / 2, (
        f"each dataloader worker holds {[round(e / 1e6, 1) for e in extra]} MB more private memory with an "
        f"epoch plan of {big_plan / 16e6:.1f}M samples than with 1,000 samples: the workers copy the plan"
    )
