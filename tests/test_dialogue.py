"""Multi-speaker dialogue through the real builder and the training stream: scene description in the system
turn, [SPEAKERn]-tagged text, several assistant audio turns; the batch is boson's collator's."""

import pytest

from higgs_ds.stream.collate import BatchCollator, batches_equal, boson_collate, make_collator

from .conftest import write_manifest

SCENE = (
    "Generate audio following instruction.\n\n<|scene_desc_start|>\nA quiet office, two colleagues talk.\n"
    "SPEAKER0: a calm female voice\nSPEAKER1: a low male voice\n<|scene_desc_end|>"
)


def _audio(name):
    return {"role": "assistant", "content": {"type": "audio", "audio_url": f"audio/{name}"}}


def _user(text):
    return {"role": "user", "content": text}


DIALOGUES = [
    {  # every turn trained
        "messages": [
            {"role": "system", "content": SCENE},
            _user("[SPEAKER0] The birch canoe slid on the smooth planks. [SPEAKER1] Rice is often served."),
            _audio("alice_001.flac"),
            _audio("bob_002.flac"),
            _user("[SPEAKER0] These days a chicken leg is a rare dish."),
            _audio("alice_004.wav"),
        ],
        "misc": {"id": "dialogue_1"},
    },
    {  # start_index 4: the first exchange is context, only the last turn is trained
        "messages": [
            {"role": "system", "content": SCENE},
            _user("[SPEAKER1] Glue the sheet. [SPEAKER0] It's easy to tell."),
            _audio("bob_016.wav"),
            _audio("carol_003.flac"),
            _user("[SPEAKER1] Four hours of steady work faced us."),
            _audio("carol_009.wav"),
        ],
        "start_index": 4,
        "misc": {"id": "dialogue_2"},
    },
]


@pytest.fixture(scope="module")
def dialogue_batch(tmp_path_factory, tiny_codec, tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    from higgs_ds.shards.build import BuildConfig, build_shards
    from higgs_ds.stream.loader import DataConfig, ShardStream, build_dataloader

    folder = tmp_path_factory.mktemp("dialogue")
    manifest = write_manifest(folder, DIALOGUES)
    summary = build_shards(
        [str(manifest)], str(folder / "shards"), tiny_codec, BuildConfig(tokenizer=str(tiny_model_dir)), progress=False
    )
    assert summary["accepted"] == 2
    tok, config = AutoTokenizer.from_pretrained(tiny_model_dir), AutoConfig.from_pretrained(tiny_model_dir)
    cfg = DataConfig(shards=[str(folder / "shards")], batch_size=2, num_workers=0, clone_references=1.0)
    samples = next(iter(ShardStream(cfg, tok, rank=0, world_size=1)))
    batch = next(iter(build_dataloader(cfg, tok, config, rank=0, world_size=1)))  # self-checked against boson
    return samples, batch, config, tok, folder / "shards"


@pytest.mark.boson_env  # boson's batch keys (audio_out_ids_start); the native layout: test_native_*
def test_dialogue_batch_equals_boson_collator(dialogue_batch):
    samples, batch, config, _, _ = dialogue_batch
    assert sorted(s.sample_id for s in samples) == ["dialogue_1", "dialogue_2"]  # dialogues never get references
    fast = BatchCollator(config)(samples)
    theirs = boson_collate(make_collator(config), samples)
    assert batches_equal({k: fast[k] for k in theirs if theirs[k] is not None}, theirs) == []
    assert [len(s.frames) for s in samples] == [3, 3]
    assert len(batch["audio_out_ids_start"]) == 6 and batch["audio_in_ids"].numel() == 0


@pytest.mark.boson_env  # boson's batch keys (audio_out_ids_start); the native layout: test_native_*
def test_dialogue_trains_each_audio_turn_after_start_index_with_its_own_codes(dialogue_batch):
    samples, batch, _, tok, _ = dialogue_batch
    labels, starts = batch["label_audio_ids"], batch["audio_out_ids_start"].tolist()
    ends = starts[1:] + [labels.shape[1]]
    segments = list(zip(starts, ends))
    expected_trained = {"dialogue_1": [True, True, True], "dialogue_2": [False, False, True]}
    k = 0
    for sample in (samples[batch["sample_ids"].index(sid)] for sid in batch["sample_ids"]):
        offset = 0
        for frames, trained in zip(sample.frames, expected_trained[sample.sample_id]):
            s, e = segments[k]
            seg = labels[:, s:e]
            assert (seg != -100).any().item() is trained
            if trained:  # codebook 0 is not delayed: its codes, then the one EOS target
                assert seg[0, 1 : 1 + frames].tolist() == sample.codes[0, offset : offset + frames].tolist()
                assert seg[0, 1 + frames].item() == 1025
            offset, k = offset + frames, k + 1
    # text labels: the [SPEAKERn] user turns and the scene are never targets
    audio_out = tok.convert_tokens_to_ids("<|AUDIO_OUT|>")
    for row, sid in enumerate(batch["sample_ids"]):
        ids, lab = batch["input_ids"][row], batch["label_ids"][row]
        trained_text = tok.decode(ids[(lab != -100) & (ids != audio_out)])
        assert "SPEAKER" not in trained_text and "quiet office" not in trained_text
        n_turns = 3 if sid == "dialogue_1" else 1
        assert trained_text.count("<|audio_out_bos|>") == n_turns


def test_dialogue_index_records_no_cloning_parts(dialogue_batch):
    from higgs_ds.stream.reader import shard_refs

    *_, shards = dialogue_batch
    (ref,) = shard_refs([str(shards)])  # a dialogue has no single speaker and is no plain TTS sample
    assert ref.speakers.tolist() == [-1, -1] and ref.clone_parts.tolist() == [[-1, -1], [-1, -1]]
