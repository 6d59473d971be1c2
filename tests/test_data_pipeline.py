"""Stages: per-rank/per-worker reader, sample encoding, collation and the loss formula."""

import collections

import pytest
import torch
import torch.nn.functional as F

from higgs_ds.dataloader import DataConfig, build_dataloader
from higgs_ds.shard_reader import ShardRef, plan_epoch, split_for_worker


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_plan_gives_every_rank_the_same_count_and_every_sample_once(world_size):
    refs = [ShardRef(f"s{i}", n) for i, n in enumerate([5, 1, 7, 3])]  # 16 samples, uneven shards
    plans = [plan_epoch(refs, seed=3, epoch=1, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(p.positions) for p in plans}) == 1
    seen = collections.Counter(pos for p in plans for pos in p.positions)
    everything = {(s, i) for s, ref in enumerate(refs) for i in range(ref.num_samples)}
    assert set(seen) == everything
    repeats = sum(seen.values()) - len(everything)
    assert repeats == plans[0].num_repeated == (-16) % world_size
    other_epoch = plan_epoch(refs, seed=3, epoch=2, rank=0, world_size=1).positions
    assert other_epoch != plan_epoch(refs, seed=3, epoch=1, rank=0, world_size=1).positions  # reshuffled
    assert sorted(other_epoch) == sorted(everything)


def test_split_for_worker_is_a_partition():
    items = list(range(11))
    parts = [split_for_worker(items, w, 3) for w in range(3)]
    assert sum(parts, []) == items and [len(p) for p in parts] == [4, 4, 3]


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 2), (3, 1)])
def test_dataloader_yields_equal_batches_per_rank(small_shards, tiny_model_dir, world_size, workers):
    from transformers import AutoConfig, AutoTokenizer

    tok, config = AutoTokenizer.from_pretrained(tiny_model_dir), AutoConfig.from_pretrained(tiny_model_dir)
    cfg = DataConfig(shards=[str(small_shards)], batch_size=2, num_workers=workers)
    counts, samples = [], 0
    for rank in range(world_size):
        loader = build_dataloader(cfg, tok, config, rank=rank, world_size=world_size)
        batches = list(loader)
        counts.append(len(batches))
        assert len(batches) == loader.dataset.num_batches()
        samples += sum(b["input_ids"].shape[0] for b in batches)
    assert len(set(counts)) == 1
    assert samples == 8 + (-8) % world_size


@pytest.fixture(scope="module")
def batch_and_model(small_shards, tiny_model_dir):
    import boson_multimodal.model.higgs_audio  # noqa: F401
    from boson_multimodal.model.higgs_audio import HiggsAudioModel
    from transformers import AutoConfig, AutoTokenizer

    tok, config = AutoTokenizer.from_pretrained(tiny_model_dir), AutoConfig.from_pretrained(tiny_model_dir)
    loader = build_dataloader(
        DataConfig(shards=[str(small_shards)], batch_size=8, num_workers=0), tok, config, rank=0, world_size=1
    )
    return next(iter(loader)), HiggsAudioModel.from_pretrained(tiny_model_dir), tok


def test_collated_batch_follows_the_delay_pattern(batch_and_model):
    batch, model, tok = batch_and_model
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] % 8 == 0
    starts = batch["audio_out_ids_start"].tolist()
    assert len(starts) == 8 + 2  # one target per sample, plus the reference audio of the 2 cloning samples
    labels, inputs = batch["label_audio_ids"], batch["audio_out_ids"]
    for s in starts:  # every segment begins with an all-BOS input column and an all -100 label column
        assert (inputs[:, s] == 1024).all() and (labels[:, s] == -100).all()
    ends = starts[1:] + [labels.shape[1]]
    trained = [(s, e) for s, e in zip(starts, ends) if (labels[:, s:e] != -100).any()]
    assert len(trained) == 8  # the cloning references are not trained (start_index)
    for s, e in trained:  # each codebook: its codes then exactly one EOS target
        assert ((labels[:, s:e] == 1025).sum(dim=1) == 1).all()


def test_loss_equals_the_formula_and_trains_both_ffns(batch_and_model):
    from higgs_ds.loss import LossConfig, higgs_loss

    batch, model, _ = batch_and_model
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    loss, metrics = higgs_loss(out.logits, out.expanded_labels, out.audio_logits, batch["label_audio_ids"])
    text = F.cross_entropy(
        out.logits[:, :-1].flatten(0, 1).float(), out.expanded_labels[:, 1:].flatten(), ignore_index=-100
    )
    audio = F.cross_entropy(
        out.audio_logits[:-1].flatten(0, 1), batch["label_audio_ids"][:, 1:].T.flatten(), ignore_index=-100
    )
    torch.testing.assert_close(loss, text + audio)
    torch.testing.assert_close(metrics["text_loss"], text.detach())
    assert 6.0 < metrics["audio_loss"] < 8.0  # ~ln(1026) for random weights
    weighted, _ = higgs_loss(
        out.logits,
        out.expanded_labels,
        out.audio_logits,
        batch["label_audio_ids"],
        LossConfig(text_weight=0.5, codebook_weights=(1, 0, 0, 0, 0, 0, 0, 0)),
    )
    torch.testing.assert_close(weighted, 0.5 * text + metrics["audio_loss_cb0"])
    loss.backward()
    assert model.layers[0].audio_mlp.gate_proj.weight.grad.abs().sum() > 0
    assert model.layers[0].mlp.gate_proj.weight.grad.abs().sum() > 0
