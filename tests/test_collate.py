"""The fast collator equals boson's HiggsAudioSampleCollator, key by key, on every kind of sample."""

import numpy as np
import pytest
import torch

from higgs_ds.stream.collate import BatchCollator, FastCollator, batches_equal, boson_collate, make_collator
from higgs_ds.stream.tokens import EncodedSample, chatml_tokens

# boson's collator is the reference here (the native layout against it: test_native_batch, test_native_equivalence)
pytestmark = pytest.mark.boson_env

SYSTEM = {"role": "system", "content": "Generate audio following instruction."}
SCENE = {"role": "system", "content": "Generate audio.\n<|scene_desc_start|>\nA quiet room.\n<|scene_desc_end|>"}


def _audio(role, name):
    return {"role": role, "content": {"type": "audio", "audio_url": f"{name}.wav"}}


def _text(role, text):
    return {"role": role, "content": text}


KINDS = {
    "tts": {"messages": [SYSTEM, _text("user", "a short line"), _audio("assistant", "t")]},
    "cloning": {
        "messages": [
            SYSTEM,
            _text("user", "ref"),
            _audio("assistant", "r"),
            _text("user", "new"),
            _audio("assistant", "t"),
        ],
        "start_index": 3,
    },
    "dialogue": {
        "messages": [
            SCENE,
            _text("user", "[SPEAKER0] hello there [SPEAKER1] hi"),
            _audio("assistant", "a"),
            _text("user", "[SPEAKER1] and again"),
            _audio("assistant", "b"),
            _audio("assistant", "c"),
        ]
    },
    "audio_in": {"messages": [_text("user", "say what you hear"), _audio("user", "in"), _text("assistant", "words")]},
    "mixed_in_out": {"messages": [SYSTEM, _audio("user", "in"), _text("user", "now you"), _audio("assistant", "o")]},
    "untrained_audio": {"messages": [SYSTEM, _text("user", "x"), _audio("assistant", "t")], "start_index": 3},
    "text_only": {"messages": [_text("user", "hello"), _text("assistant", "hi there")]},
}


@pytest.fixture(scope="module")
def tok_and_config(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoConfig.from_pretrained(tiny_model_dir)


def _samples(tok, rng, n):
    """n random samples of every kind, with random clip lengths (1-40 frames) and random codes."""
    samples = []
    for i in range(n):
        kind = list(KINDS)[i % len(KINDS)]
        input_ids, label_ids, num_audio = chatml_tokens(KINDS[kind], tok, kind)
        frames = [int(rng.randint(1, 41)) for _ in range(num_audio)]
        codes = rng.randint(0, 1024, size=(8, sum(frames))).astype(np.uint16)
        samples.append(EncodedSample(f"{kind}-{i}", np.asarray(input_ids), np.asarray(label_ids), codes, frames))
    return samples


def test_every_kind_of_sample_has_the_audio_and_labels_boson_gives_it(tok_and_config):
    tok, config = tok_and_config
    samples = _samples(tok, np.random.RandomState(0), len(KINDS))
    batch = boson_collate(make_collator(config), samples)
    # what the kinds are for: cloning's reference and an untrained clip give -100 audio labels
    assert len(batch["audio_out_ids_start"]) == 1 + 2 + 3 + 0 + 1 + 1 + 0
    assert len(batch["audio_in_ids_start"]) == 2
    trained = (batch["label_audio_ids"] != -100).any(dim=0)
    starts = batch["audio_out_ids_start"].tolist() + [batch["label_audio_ids"].shape[1]]
    per_segment = [bool(trained[s:e].any()) for s, e in zip(starts, starts[1:])]
    assert per_segment == [True, False, True, True, True, True, True, False]


@pytest.mark.parametrize("variant", ["released", "no_delay", "no_audio_in_tokens"])
def test_fast_collator_equals_boson_on_random_batches(tok_and_config, variant):
    tok, config = tok_and_config
    config = config.__class__.from_dict(config.to_dict())
    if variant == "no_delay":
        config.use_delay_pattern = False
    if variant == "no_audio_in_tokens":
        config.encode_audio_in_tokens = False
    rng = np.random.RandomState(1)
    pool = _samples(tok, rng, 60)
    fast, boson = FastCollator(config), make_collator(config)
    batches = [[pool[i] for i in rng.choice(len(pool), size=rng.randint(1, 9), replace=False)] for _ in range(40)]
    batches += [[pool[6], pool[13]], [pool[3]]]  # text only (no audio at all); audio-in only
    for batch in batches:
        ours, theirs = fast(batch), boson_collate(boson, batch)
        assert batches_equal(ours, theirs) == [], [s.sample_id for s in batch]
    assert fast([pool[6]])["audio_out_ids"].shape == (0, 0)


def test_batch_collator_checks_itself_against_boson(tok_and_config):
    tok, config = tok_and_config
    samples = _samples(tok, np.random.RandomState(2), 7)
    collate = BatchCollator(config)
    assert collate.check_batches == 1
    batch = collate(samples)
    assert collate.check_batches == 0 and batch["sample_ids"] == [s.sample_id for s in samples]
    torch.testing.assert_close(batch["labels"], batch["label_ids"])

    class Broken(FastCollator):  # a fast path that goes wrong must stop training, naming the samples
        def __call__(self, samples):
            batch = super().__call__(samples)
            batch["label_audio_ids"][0, 3] = 7
            return batch

    collate = BatchCollator(config)
    collate.fast = Broken(config)
    with pytest.raises(RuntimeError, match="label_audio_ids.*tts-0"):
        collate(samples)
    with pytest.raises(ValueError, match="'fast' or 'boson'"):
        BatchCollator(config, mode="quick")


def test_a_sample_whose_tokens_and_audio_disagree_is_named(tok_and_config):
    tok, config = tok_and_config
    sample = _samples(tok, np.random.RandomState(3), 2)[1]  # cloning: 2 audio items
    sample.frames = sample.frames[:1]
    with pytest.raises(ValueError, match="cloning-1.*2 audio placeholders.*1 audio items"):
        FastCollator(config)([sample])
