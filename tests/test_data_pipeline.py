"""Stages: per-rank/per-worker reader, sample encoding, collation and the loss formula."""

import collections

import pytest
import torch
import torch.nn.functional as F

from higgs_ds.models.interface import config_family, logits_for_loss
from higgs_ds.stream.collate import model_inputs
from higgs_ds.stream.loader import DataConfig, build_dataloader
from higgs_ds.stream.plan import BatchingConfig, PlanError, ShardRef, batches_for_worker, plan_epoch

from .envs import decoder_layers, load_tiny

UNEVEN = [ShardRef(f"s{i}", n, tuple(range(10 + 40 * i, 10 + 40 * i + n))) for i, n in enumerate([5, 1, 7, 3])]


def _flat(plan):
    return [pos for batch in plan.batches for pos in batch]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batching", [BatchingConfig(batch_size=3), BatchingConfig(max_tokens=400)])
def test_plan_gives_every_rank_equal_batches_and_every_sample_once(world_size, batching):
    plans = [plan_epoch(UNEVEN, batching, seed=3, epoch=1, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(p.batches) for p in plans}) == 1
    seen = collections.Counter(pos for p in plans for pos in _flat(p))
    everything = {(s, i) for s, ref in enumerate(UNEVEN) for i in range(ref.num_samples)}
    assert set(seen) == everything
    assert sum(seen.values()) - len(everything) == sum(p.num_repeated for p in plans)
    if batching.max_tokens:  # the budget holds for every batch: samples x longest <= max_tokens
        for p in plans:
            assert all(len(b) * max(UNEVEN[s].lengths[i] for s, i in b) <= 400 for b in p.batches)


def test_plan_order_depends_on_seed_and_epoch_only():
    one = plan_epoch(UNEVEN, BatchingConfig(batch_size=2), seed=3, epoch=1, rank=0, world_size=1)
    again = plan_epoch(UNEVEN, BatchingConfig(batch_size=2), seed=3, epoch=1, rank=0, world_size=1)
    other = plan_epoch(UNEVEN, BatchingConfig(batch_size=2), seed=3, epoch=2, rank=0, world_size=1)
    assert one.batches == again.batches and _flat(one) != _flat(other) and sorted(_flat(one)) == sorted(_flat(other))
    within = [i for s, i in _flat(one) if s == 2]
    assert within != sorted(within)  # shuffled inside the shard too


def test_over_long_samples_are_dropped_and_counted():
    plan = plan_epoch(UNEVEN, BatchingConfig(batch_size=2, max_length=80), seed=0, epoch=0, rank=0, world_size=1)
    assert plan.num_dropped == len(plan.dropped) == 7 + 3  # shards 2 and 3 hold lengths 90-96 and 130-132
    assert all(UNEVEN[s].lengths[i] > 80 for s, i in plan.dropped)
    with pytest.raises(PlanError, match="--tokenizer"):
        plan_epoch([ShardRef("x", 3)], BatchingConfig(max_tokens=10), seed=0, epoch=0, rank=0, world_size=1)


def test_budget_batching_wastes_less_than_fixed_batches():
    refs = [ShardRef("a", 200, tuple(50 + (i * 37) % 700 for i in range(200)))]
    budget = plan_epoch(refs, BatchingConfig(max_tokens=2000), seed=0, epoch=0, rank=0, world_size=1)
    fixed = plan_epoch(refs, BatchingConfig(batch_size=8), seed=0, epoch=0, rank=0, world_size=1)
    assert budget.real_position_fraction(refs) > 0.9 > fixed.real_position_fraction(refs)


def test_worker_shares_interleave_back_into_the_plan():
    batches = list(range(11))
    shares = [batches_for_worker(batches, w, 3) for w in range(3)]
    merged = [shares[i % 3][i // 3] for i in range(11)]
    assert merged == batches


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
    """A batch of the small shards in this environment's family's layout, and its tiny model."""
    tok, config, model = load_tiny(tiny_model_dir)
    loader = build_dataloader(
        DataConfig(shards=[str(small_shards)], batch_size=8, num_workers=0), tok, config, rank=0, world_size=1
    )
    return next(iter(loader)), model, tok


@pytest.mark.boson_env  # boson's batch keys; the native layout: test_native_batch.py
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
    from higgs_ds.train.loss import LossConfig, higgs_loss

    batch, model, _ = batch_and_model
    out = logits_for_loss(model, batch, config_family(model.config))
    loss, metrics = higgs_loss(out.text_logits, out.text_labels, out.audio_logits, batch["label_audio_ids"])
    text = F.cross_entropy(
        out.text_logits[:, :-1].flatten(0, 1).float(), out.text_labels[:, 1:].flatten(), ignore_index=-100
    )
    audio = F.cross_entropy(
        out.audio_logits[:-1].flatten(0, 1), batch["label_audio_ids"][:, 1:].T.flatten(), ignore_index=-100
    )
    torch.testing.assert_close(loss, text + audio)
    torch.testing.assert_close(metrics["text_loss"], text.detach())
    assert 6.0 < metrics["audio_loss"] < 8.0  # ~ln(1026) for random weights
    weighted, _ = higgs_loss(
        out.text_logits,
        out.text_labels,
        out.audio_logits,
        batch["label_audio_ids"],
        LossConfig(text_weight=0.5, codebook_weights=(1, 0, 0, 0, 0, 0, 0, 0)),
    )
    torch.testing.assert_close(weighted, 0.5 * text + metrics["audio_loss_cb0"])
    loss.backward()
    assert decoder_layers(model)[0].audio_mlp.gate_proj.weight.grad.abs().sum() > 0
    assert decoder_layers(model)[0].mlp.gate_proj.weight.grad.abs().sum() > 0


def test_token_ids_stored_at_build_time_equal_boson_tokenization(small_shards, tiny_model_dir):
    from transformers import AutoTokenizer

    from higgs_ds.stream.loader import ShardStream
    from higgs_ds.stream.reader import read_shard
    from higgs_ds.stream.tokens import SampleEncoder

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert ShardStream(DataConfig(shards=[str(small_shards)]), tok, rank=0, world_size=1).encode.stored_tokens
    stored, fresh = SampleEncoder(tok, stored_tokens=True), SampleEncoder(tok, stored_tokens=False)
    for _, record in read_shard(str(small_shards / "shard-000000.tar")):
        assert record["token_ids"] is not None and "input_ids" not in record["json"]  # the KEY.tokens.npy member
        a, b = stored(record), fresh(record)
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.label_ids.tolist() == b.label_ids.tolist()


@pytest.mark.boson_env  # boson's class refuses HF's switch: higgs-ds wraps its layers (models.patches)
def test_activation_checkpointing_gives_the_same_loss_and_gradients(batch_and_model, tiny_model_dir, monkeypatch):
    import boson_multimodal.model.higgs_audio  # noqa: F401
    import torch.utils.checkpoint
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from higgs_ds.models.patches import patch_for_training
    from higgs_ds.train.loss import higgs_loss

    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k)
    )
    batch = batch_and_model[0]
    results = []
    for checkpointing in ("off", "config", "hf_switch"):  # hf_switch: what SWIFT's --gradient_checkpointing calls
        model = patch_for_training(
            HiggsAudioModel.from_pretrained(tiny_model_dir), activation_checkpointing=checkpointing == "config"
        )
        if checkpointing == "hf_switch":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.gradient_checkpointing_enable()  # twice: still one wrapper per layer
        calls.clear()
        out = model(**model_inputs(batch), labels=None)  # labels=None as PEFT passes it
        assert len(calls) == (0 if checkpointing == "off" else len(model.layers))
        loss, _ = higgs_loss(out.logits, out.expanded_labels, out.audio_logits, batch["label_audio_ids"])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), *others = results
    for loss_b, grads_b in others:
        torch.testing.assert_close(loss_a, loss_b)
        for name in grads_a:
            torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)
    assert model.get_input_embeddings() is model.embed_tokens


@pytest.mark.native_env
def test_native_activation_checkpointing_recomputes_each_layer_and_gives_the_same_loss_and_gradients(
    batch_and_model, tiny_model_dir
):
    from higgs_ds.models.native.load import load_native_model
    from higgs_ds.train.loss import higgs_loss

    batch = batch_and_model[0]
    results = []
    for checkpointing in (False, True):
        model = load_native_model(tiny_model_dir).train()
        if checkpointing:  # what HiggsAudioLoader calls for activation_checkpointing = true
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls = collections.Counter()
        for i, layer in enumerate(decoder_layers(model)):
            # a pre-hook: the recomputation in the backward pass stops early, before a forward hook would run
            layer.register_forward_pre_hook(lambda *_, i=i: calls.update([i]))
        out = logits_for_loss(model, batch, "native")
        loss, _ = higgs_loss(out.text_logits, out.text_labels, out.audio_logits, batch["label_audio_ids"])
        loss.backward()
        # a checkpointed layer runs again in the backward pass
        assert set(calls.values()) == {2 if checkpointing else 1}
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)
