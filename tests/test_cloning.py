"""Voice-cloning references drawn from other samples of the same speaker (data.clone_references)."""

import numpy as np
import pytest

from higgs_ds.stream.loader import DataConfig, ShardStream, build_dataloader
from higgs_ds.stream.plan import BatchingConfig, PlanError, ShardRef, clone_length, plan_epoch
from higgs_ds.stream.reader import load_index, read_shard, sample_table, shard_refs
from higgs_ds.stream.tokens import chatml_tokens, clone_chatml, expanded_length

PLAIN = {"alice_001", "alice_004", "bob_002", "bob_016", "carol_003", "carol_009"}  # small_shards' plain TTS


@pytest.fixture(scope="module")
def tok_config(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoConfig.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def records(small_shards):
    """sample id -> (json, codes) of every sample in small_shards."""
    out = {}
    for shard in load_index(small_shards)["shards"]:
        for _, record in read_shard(str(small_shards / shard["file"])):
            out[record["json"]["id"]] = record
    return out


def _ids(stream) -> list[list[str]]:
    return [[s.sample_id for s in batch] for batch in stream]


def test_index_records_each_samples_speaker_and_turn_lengths(small_shards, records):
    from higgs_ds.shards.verify import verify_shards

    seen = []
    speaker_names = sample_table(small_shards).speaker_names
    for ref in shard_refs([str(small_shards)]):
        assert len(ref.speakers) == len(ref.clone_parts) == len(ref.lengths) == ref.num_samples
        for position, record in read_shard(ref.path):
            meta, parts = record["json"], ref.clone_parts[position].tolist()
            speaker = int(ref.speakers[position])
            assert (speaker_names[speaker] if speaker >= 0 else None) == meta["speaker"]
            assert (parts != [-1, -1]) == (meta["id"] in PLAIN)  # manifest cloning samples are not plain TTS
            if parts[0] >= 0:  # head + pair, rounded, is the sample's own expanded length
                assert -(-sum(parts) // 8) * 8 == ref.lengths[position] == meta["expanded_length"]
            seen.append(meta["id"])
    assert sorted(seen) == sorted(records)
    assert verify_shards(str(small_shards), progress=False)["bad_shards"] == {}


def test_every_reference_is_another_sample_of_the_speaker_tokenized_as_boson_does(small_shards, records, tok_config):
    tok, config = tok_config
    stream = ShardStream(
        DataConfig(shards=[str(small_shards)], batch_size=4, clone_references=1.0), tok, rank=0, world_size=1
    )
    plan, refs = stream.plan(), stream.refs
    assert plan.clone == {"eligible": 6, "drawn": 6, "cloned": 6, "lonely": 0, "too_long": 0}
    samples = [s for batch in stream for s in batch]
    assert len(samples) == 8
    cloned = [s for s in samples if " ref=" in s.sample_id]
    assert len(cloned) == 6
    for sample in cloned:
        target_id, ref_id = sample.sample_id.split(" ref=")
        target, ref = records[target_id], records[ref_id]
        assert target_id in PLAIN and ref_id in PLAIN and ref_id != target_id
        assert ref["json"]["speaker"] == target["json"]["speaker"]
        # the token ids are those boson's prepare_chatml_sample gives the assembled ChatML
        assembled = clone_chatml(target["json"], ref["json"])
        assert assembled["messages"][1:3] == ref["json"]["messages"][1:] and assembled["start_index"] == 3
        input_ids, label_ids, num_audio = chatml_tokens(assembled, tok)
        assert sample.input_ids.tolist() == input_ids and sample.label_ids.tolist() == label_ids and num_audio == 2
        assert np.array_equal(sample.codes, np.concatenate([ref["codes"], target["codes"]], axis=1))
        # the plan knew the assembled length before the epoch
        pos = next(p for p, r in plan.references.items() if _sid(refs, p, records) == target_id)
        assert _sid(refs, plan.references[pos], records) == ref_id
        assert clone_length(refs, pos, plan.references[pos]) == expanded_length(len(input_ids), sample.frames)
        assert clone_length(refs, pos, plan.references[pos]) > refs[pos[0]].lengths[pos[1]]


def _sid(refs, pos, records):
    """The sample id at a plan position (shard files hold samples in index order)."""
    for position, record in read_shard(refs[pos[0]].path):
        if position == pos[1]:
            return record["json"]["id"]


@pytest.mark.boson_env  # boson's batch keys (audio_out_ids_start); the native layout: test_native_*
def test_only_the_target_audio_is_trained(small_shards, records, tok_config):
    tok, config = tok_config
    cfg = DataConfig(shards=[str(small_shards)], batch_size=8, num_workers=0, clone_references=1.0)
    batch = next(iter(build_dataloader(cfg, tok, config, rank=0, world_size=1)))  # checked against boson's
    labels, starts = batch["label_audio_ids"], batch["audio_out_ids_start"].tolist()
    assert len(starts) == 8 + 2 + 6  # every target, the manifest's 2 references, the 6 drawn references
    ends = starts[1:] + [labels.shape[1]]
    trained = [(s, e) for s, e in zip(starts, ends) if (labels[:, s:e] != -100).any()]
    assert len(trained) == 8
    # sample by sample, the trained segment is the target's own codes (codebook 0 is not delayed)
    segments = iter(trained)
    for sid in batch["sample_ids"]:
        s, _ = next(segments)
        codes = records[sid.split(" ref=")[0]]["codes"]
        if sid.split(" ref=")[0].startswith("clone_"):  # a manifest cloning sample: its target is its 2nd audio
            codes = codes[:, records[sid]["json"]["audio"][0]["frames"] :]
        assert labels[0, s + 1 : s + 1 + codes.shape[1]].tolist() == codes[0].tolist()


def test_budget_plan_and_length_limit_use_the_assembled_length(small_shards):
    refs = shard_refs([str(small_shards)])
    cfg = BatchingConfig(max_tokens=400, clone_references=1.0)
    plan = plan_epoch(refs, cfg, seed=1, epoch=0, rank=0, world_size=1)
    assert len(plan.references) == 6

    def length(p):
        return clone_length(refs, p, plan.references[p]) if p in plan.references else refs[p[0]].lengths[p[1]]

    assert all(len(b) * max(length(p) for p in b) <= 400 for b in plan.batches)
    plain = plan_epoch(refs, BatchingConfig(max_tokens=400), seed=1, epoch=0, rank=0, world_size=1)
    assert plan.real_position_fraction(refs) is not None and len(plan.batches) > len(plain.batches)
    # a limit between the plain and the assembled lengths keeps every sample, plain, and counts them
    plain_lengths = [n for r in refs for n, parts in zip(r.lengths, r.clone_parts) if parts[0] >= 0]  # plain TTS
    shortest_clone = min(clone_length(refs, p, r) for p, r in plan.references.items())
    assert max(plain_lengths) < shortest_clone
    tight = BatchingConfig(batch_size=2, max_length=max(plain_lengths), clone_references=1.0)
    limited = plan_epoch(refs, tight, seed=1, epoch=0, rank=0, world_size=1)
    assert limited.references == {} and limited.clone["too_long"] == 6
    assert limited.num_dropped == sum(n > max(plain_lengths) for r in refs for n in r.lengths)  # never a plain one


def test_references_are_the_same_for_any_worker_count_and_after_a_resume(small_shards, tok_config):
    tok, config = tok_config
    base = dict(shards=[str(small_shards)], batch_size=1, seed=4, clone_references=0.5)
    runs = {}
    for workers in (0, 2):
        loader = build_dataloader(DataConfig(**base, num_workers=workers), tok, config, rank=0, world_size=2)
        loader.seek(epoch=2)
        runs[workers] = [b["sample_ids"] for b in loader]
    assert runs[0] == runs[2] and any(" ref=" in ids[0] for ids in runs[0])
    loader = build_dataloader(DataConfig(**base, num_workers=2), tok, config, rank=0, world_size=2)
    loader.seek(epoch=2)
    it = iter(loader)
    first = [next(it)["sample_ids"], next(it)["sample_ids"]]
    state = loader.state_dict()
    del it
    resumed = build_dataloader(DataConfig(**base, num_workers=1), tok, config, rank=0, world_size=2)
    resumed.load_state_dict(state)
    assert first + [b["sample_ids"] for b in resumed] == runs[0]
    other = build_dataloader(DataConfig(**(base | {"clone_references": 1.0})), tok, config, rank=0, world_size=2)
    with pytest.raises(PlanError, match="clone_references"):
        other.load_state_dict(state)


def _refs(speakers_per_set):
    """Synthetic shards: one per set, samples with the given speakers (None: not plain TTS)."""
    return [
        ShardRef(
            f"set{d}.tar",
            len(spk),
            tuple(40 for _ in spk),
            dataset=d,
            speakers=tuple(spk),
            clone_parts=tuple((10, 25) if s else None for s in spk),
        )
        for d, spk in enumerate(speakers_per_set)
    ]


def test_a_speaker_with_one_sample_stays_plain_and_is_counted_and_sets_do_not_mix():
    refs = _refs([["a", "a", "b", None, "a"], ["b", "c", "c"]])
    cfg = BatchingConfig(batch_size=2, weights=(1.0, 1.0), clone_references=1.0)
    plans = [plan_epoch(refs, cfg, seed=0, epoch=e, rank=0, world_size=1) for e in range(4)]
    for plan in plans:
        assert plan.clone == {"eligible": 7, "drawn": 7, "cloned": 5, "lonely": 2, "too_long": 0}
        for pos, ref in plan.references.items():  # same set, same speaker, never itself
            assert ref != pos and ref[0] == pos[0]
            assert refs[ref[0]].speakers[ref[1]] == refs[pos[0]].speakers[pos[1]]
        assert (0, 2) not in plan.references and (1, 0) not in plan.references  # b is alone in each set
    assert len({tuple(sorted(p.references.items())) for p in plans}) > 1  # drawn anew each epoch
    half = plan_epoch(
        _refs([["a"] * 400]), BatchingConfig(clone_references=0.25), seed=0, epoch=0, rank=0, world_size=1
    )
    assert 70 < half.clone["cloned"] == half.clone["drawn"] < 130


def test_an_index_without_speakers_is_refused_with_what_to_do():
    old = [ShardRef("old/shard-000000.tar", 4, (16, 16, 16, 16))]
    assert plan_epoch(old, BatchingConfig(), seed=0, epoch=0, rank=0, world_size=1).references == {}
    with pytest.raises(PlanError, match="old/shard-000000.tar.*rebuild"):
        plan_epoch(old, BatchingConfig(clone_references=0.5), seed=0, epoch=0, rank=0, world_size=1)
    with pytest.raises(PlanError, match="fraction"):
        DataConfig(shards=["x"], clone_references=1.5)


@pytest.mark.parametrize("user_text", ["a plain line", "a line with <|start_header_id|> typed in it"])
def test_composed_tokens_equal_boson_and_a_header_in_the_text_takes_boson_path(tok_config, user_text):
    from higgs_ds.stream.tokens import SampleEncoder

    tok, _ = tok_config

    def record(sid, text, frames):
        messages = [
            {"role": "system", "content": "Generate audio.\n<|scene_desc_start|>\nA hall.\n<|scene_desc_end|>"},
            {"role": "user", "content": text},
            {"role": "assistant", "content": {"type": "audio", "audio_url": f"{sid}.wav"}},
        ]
        meta = {"messages": messages, "speaker": "s", "id": sid, "audio": [{"frames": frames}]}
        return {"json": meta, "codes": np.full((8, frames), frames, np.uint16)}

    target, ref = record("t", user_text, 5), record("r", "the reference line", 7)
    sample = SampleEncoder(tok).with_reference(target, ref)
    input_ids, label_ids, _ = chatml_tokens(clone_chatml(target["json"], ref["json"]), tok)
    assert sample.input_ids.tolist() == input_ids and sample.label_ids.tolist() == label_ids
    assert sample.frames == [7, 5] and sample.sample_id == "t ref=r"
