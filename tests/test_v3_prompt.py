"""Higgs TTS 3 prompts and delay pattern (higgs_ds.models.v3.prompt / delay), against hand-written layouts."""

from __future__ import annotations

import numpy as np
import pytest

from higgs_ds.models.v3.delay import apply_v3_delay, undo_v3_delay, v3_labels
from higgs_ds.models.v3.prompt import V3SampleEncoder, v3_length
from higgs_ds.models.v3.tokenizer import build_tiny_v3_tokenizer
from higgs_ds.stream.tokens import EncodingError, clone_chatml

B, E, X = 1024, 1025, -100  # BOC, EOC, ignored


@pytest.fixture(scope="module")
def tok():
    return build_tiny_v3_tokenizer()


@pytest.fixture(scope="module")
def enc(tok):
    return V3SampleEncoder(tok)


def ids_of(tok, *tokens):
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def text_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def record(sample_id, text, frames, seed=0, system="Generate audio following instruction."):
    codes = np.random.default_rng(seed).integers(0, 1024, (8, frames))
    meta = {
        "id": sample_id,
        "speaker": "spk",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": text},
            {"role": "assistant", "content": {"type": "audio", "audio_url": f"{sample_id}.wav"}},
        ],
        "audio": [{"frames": frames}],
    }
    return {"json": meta, "codes": codes}


def clone_record(target, ref, sample_id="clone"):
    meta = clone_chatml(target["json"], ref["json"])
    meta.update(id=sample_id, audio=[ref["json"]["audio"][0], target["json"]["audio"][0]])
    return {"json": meta, "codes": np.concatenate([ref["codes"], target["codes"]], axis=1)}


def delayed_by_hand(codes):
    """The facts doc's rule, one cell at a time."""
    k, t = codes.shape
    rows = np.full((t + k - 1, k), E)
    for r in range(t + k - 1):
        for c in range(k):
            if r < c:
                rows[r, c] = B
            elif r < c + t:
                rows[r, c] = codes[c, r - c]
    return rows


# ------------------------------------------------------------------ delay


def test_delay_two_frames_by_hand():
    codes = np.array([[7, 8], [17, 18], [27, 28], [37, 38], [47, 48], [57, 58], [67, 68], [77, 78]])
    expected = np.array(
        [
            [7, B, B, B, B, B, B, B],
            [8, 17, B, B, B, B, B, B],
            [E, 18, 27, B, B, B, B, B],
            [E, E, 28, 37, B, B, B, B],
            [E, E, E, 38, 47, B, B, B],
            [E, E, E, E, 48, 57, B, B],
            [E, E, E, E, E, 58, 67, B],
            [E, E, E, E, E, E, 68, 77],
            [E, E, E, E, E, E, E, 78],
        ]
    )
    np.testing.assert_array_equal(apply_v3_delay(codes), expected)
    np.testing.assert_array_equal(undo_v3_delay(expected), codes)


def test_delay_three_frames_full_by_hand():
    codes = np.array([[10 * c + t for t in range(3)] for c in range(8)])
    expected = np.array(
        [
            [0, B, B, B, B, B, B, B],
            [1, 10, B, B, B, B, B, B],
            [2, 11, 20, B, B, B, B, B],
            [E, 12, 21, 30, B, B, B, B],
            [E, E, 22, 31, 40, B, B, B],
            [E, E, E, 32, 41, 50, B, B],
            [E, E, E, E, 42, 51, 60, B],
            [E, E, E, E, E, 52, 61, 70],
            [E, E, E, E, E, E, 62, 71],
            [E, E, E, E, E, E, E, 72],
        ]
    )
    rows = apply_v3_delay(codes)
    assert rows.dtype == np.int64
    np.testing.assert_array_equal(rows, expected)
    assert not (rows == B).all(axis=1).any() and not (rows == E).all(axis=1).any()  # no all-BOC/EOC row
    np.testing.assert_array_equal(undo_v3_delay(rows), codes)


@pytest.mark.parametrize("frames", [1, 5, 64])
def test_undo_inverts_apply_on_random_codes(frames):
    codes = np.random.default_rng(frames).integers(0, 1024, (8, frames))
    rows = apply_v3_delay(codes)
    np.testing.assert_array_equal(rows, delayed_by_hand(codes))
    np.testing.assert_array_equal(undo_v3_delay(rows), codes)


def test_labels_mask_boc_keep_eoc_cell_by_cell():
    codes = np.array([[5], [6], [7], [8], [9], [10], [11], [12]])
    expected = np.array(
        [
            [5, X, X, X, X, X, X, X],
            [E, 6, X, X, X, X, X, X],
            [E, E, 7, X, X, X, X, X],
            [E, E, E, 8, X, X, X, X],
            [E, E, E, E, 9, X, X, X],
            [E, E, E, E, E, 10, X, X],
            [E, E, E, E, E, E, 11, X],
            [E, E, E, E, E, E, E, 12],
        ]
    )
    np.testing.assert_array_equal(v3_labels(apply_v3_delay(codes)), expected)


# ------------------------------------------------------------------ prompts


def test_zero_shot_layout_by_hand(tok, enc):
    rec = record("s1", "Hello there.", frames=3)
    sample = enc(rec)
    tts, text, audio = ids_of(tok, "<|tts|>", "<|text|>", "<|audio|>")
    expected = [tts, text, *text_ids(tok, "Hello there."), audio] + [X] * 10
    assert sample.input_ids.dtype == np.int64
    assert sample.input_ids.tolist() == expected
    assert sample.sample_id == "s1"
    assert sample.out_start == expected.index(audio) and sample.out_frames == 3
    np.testing.assert_array_equal(sample.slot_rows, delayed_by_hand(rec["codes"]))
    assert len(sample.input_ids) == v3_length(len(text_ids(tok, "Hello there.")), 3)


def cloning_expected(tok, ref_text, ref_frames, text, frames):
    tts, text_tok, audio, ref_text_tok, ref_audio = ids_of(
        tok, "<|tts|>", "<|text|>", "<|audio|>", "<|ref_text|>", "<|ref_audio|>"
    )
    return (
        [tts, ref_text_tok, *text_ids(tok, ref_text), ref_audio]
        + [X] * (ref_frames + 7)
        + [text_tok, *text_ids(tok, text), audio]
        + [X] * (frames + 7)
    )


def test_cloning_layout_by_hand_both_ways(tok, enc):
    target, ref = record("t", "Say this.", 4, seed=1), record("r", "I said that.", 2, seed=2)
    expected = cloning_expected(tok, "I said that.", 2, "Say this.", 4)
    rows = np.concatenate([delayed_by_hand(ref["codes"]), delayed_by_hand(target["codes"])])
    paired, stored = enc.with_reference(target, ref), enc(clone_record(target, ref))
    for sample in (paired, stored):
        assert sample.input_ids.tolist() == expected
        np.testing.assert_array_equal(sample.slot_rows, rows)
        assert sample.out_frames == 4
        assert sample.input_ids[sample.out_start] == tok.convert_tokens_to_ids("<|audio|>")
        assert len(sample.input_ids) - sample.out_start == 4 + 8
    assert paired.sample_id == "t ref=r" and stored.sample_id == "clone"
    assert len(expected) == v3_length(len(text_ids(tok, "Say this.")), 4, len(text_ids(tok, "I said that.")), 2)


def test_v3_length_by_hand():
    assert v3_length(5, 3) == 3 + 5 + 3 + 7
    assert v3_length(5, 3, 4, 2) == 18 + 2 + 4 + 2 + 7
    assert v3_length(5, 3, 0, 2) == 18 + 1 + 2 + 7  # no transcript: no <|ref_text|>


def test_reference_without_transcript_has_no_ref_text(tok, enc):
    sample = enc.with_reference(record("t", "Go.", 2), record("r", "", 1))
    tts, text, audio, ref_audio = ids_of(tok, "<|tts|>", "<|text|>", "<|audio|>", "<|ref_audio|>")
    assert sample.input_ids.tolist() == [tts, ref_audio] + [X] * 8 + [text, *text_ids(tok, "Go."), audio] + [X] * 9
    assert len(sample.input_ids) == v3_length(len(text_ids(tok, "Go.")), 2, 0, 1)


def test_system_turn_is_not_used(enc):
    a = enc(record("a", "Same text.", 2, system="A quiet room."))
    b = enc(record("a", "Same text.", 2, system="<|scene_desc_start|> A storm. <|scene_desc_end|>"))
    assert a.input_ids.tolist() == b.input_ids.tolist()


def test_control_tag_stays_one_token(tok, enc):
    tag = tok.convert_tokens_to_ids("<|emotion:anger|>")
    sample = enc(record("c", "<|emotion:anger|> Stop it.", 2))
    tts, text, audio = ids_of(tok, "<|tts|>", "<|text|>", "<|audio|>")
    assert sample.input_ids.tolist() == [tts, text, tag, *text_ids(tok, " Stop it."), audio] + [X] * 9
    assert sample.input_ids.tolist().count(tag) == 1


def test_generation_prompt_is_the_training_prompt(enc):
    target, ref = record("t", "Say this.", 4, seed=1), record("r", "I said that.", 2, seed=2)
    sample = enc.with_reference(target, ref)
    ids, rows = enc.prompt("Say this.", "I said that.", ref["codes"])
    assert ids.tolist() == sample.input_ids[: sample.out_start + 1].tolist()
    np.testing.assert_array_equal(rows, sample.slot_rows[:9])


# ------------------------------------------------------------------ refused records


def edited(rec, **changes):
    meta = {**rec["json"], **changes}
    return {"json": meta, "codes": rec["codes"]}


def refused_cases():
    base = record("bad", "Hi.", 2)
    msgs = base["json"]["messages"]
    audio = msgs[2]
    two = clone_record(record("x", "a", 2), record("y", "b", 2))
    yield "dialogue tags", edited(base, messages=[msgs[0], {"role": "user", "content": "[SPEAKER0] Hi."}, audio])
    yield "two trained audio turns", edited(two, id="bad", start_index=None)
    yield "no audio", edited(base, messages=msgs[:2] + [{"role": "assistant", "content": "text"}], audio=[])
    yield "recipient", edited(base, messages=msgs[:2] + [{**audio, "recipient": "bob"}])
    yield (
        "audio in the user turn",
        edited(base, messages=[msgs[0], {"role": "user", "content": audio["content"]}, audio]),
    )
    yield "three pairs", edited(base, messages=msgs + msgs[1:] + msgs[1:], audio=[{"frames": 1}] * 3)
    yield "codes do not match", {"json": base["json"], "codes": base["codes"][:, :1]}
    yield (
        "a prompt token in the text",
        edited(base, messages=[msgs[0], {"role": "user", "content": "a<|audio|>"}, audio]),
    )


@pytest.mark.parametrize("case", list(refused_cases()), ids=lambda c: c[0])
def test_rejected_records_name_the_sample(enc, case):
    _, rec = case
    with pytest.raises(EncodingError, match="'bad'") as err:
        enc(rec)
    if case[0] not in ("a prompt token in the text", "codes do not match"):
        assert "single-speaker TTS" in str(err.value) and "cloning" in str(err.value)


def test_with_reference_refuses_a_cloning_sample(enc):
    two = clone_record(record("x", "a", 2), record("y", "b", 2), sample_id="already")
    with pytest.raises(EncodingError, match="'already' is already a cloning sample"):
        enc.with_reference(two, record("r", "c", 2))
