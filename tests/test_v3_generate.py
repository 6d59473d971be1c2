"""Higgs TTS 3 generation: the delay rules cell by cell, the cached loop against a loop written here that
recomputes the whole sequence each step, the stop at codebook 0's EOC plus 6 rows, and the prompt of a
synthesis record being the training prompt's prefix."""

import numpy as np
import pytest
import torch

from higgs_ds.models.v3.checkpoint import FUSED_TABLE, load_v3_model
from higgs_ds.models.v3.generate import BOC, EOC, choose_row, generate_v3_codes, record_prompt, row_constraints
from higgs_ds.models.v3.prompt import V3SampleEncoder
from higgs_ds.models.v3.tiny_model import write_tiny_v3_model
from higgs_ds.models.v3.tokenizer import build_tiny_v3_tokenizer

K, V = 8, 1026


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory):
    return write_tiny_v3_model(tmp_path_factory.mktemp("tiny-v3"), seed=1)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_v3_tokenizer()


def test_row_constraints_cell_by_cell():
    forced, eoc = row_constraints(0, None)
    assert forced.tolist() == [-1] + [BOC] * 7 and eoc.tolist() == [True] + [False] * 7
    forced, eoc = row_constraints(3, None)
    assert forced.tolist() == [-1] * 4 + [BOC] * 4
    forced, eoc = row_constraints(12, 10)  # codebook c has ended once r >= c + T: c = 0, 1, 2
    assert forced.tolist() == [EOC] * 3 + [-1] * 5 and not eoc.any()
    forced, _ = row_constraints(2, 1)  # a 1-frame audio: row 2 is EOC on 0-1, data on 2, BOC after
    assert forced.tolist() == [EOC, EOC, -1] + [BOC] * 5


def test_choose_row_never_samples_boc_and_only_codebook_0_may_end():
    logits = torch.zeros(K, V)
    logits[:, BOC] = 10.0  # the best logit everywhere, and never chosen where sampling
    logits[:, EOC] = 5.0
    row = choose_row(logits, 9, None, temperature=0, top_k=None, top_p=None, generator=None)
    assert row[0] == EOC and all(0 <= c < 1024 for c in row[1:])


def _masked_argmax(logits: torch.Tensor, r: int, frames) -> np.ndarray:
    """The rules of the model notes, written out again: BOC before a codebook starts, EOC after it ends,
    otherwise the best code (codebook 0 may also pick EOC while the audio has not ended)."""
    row = []
    for c in range(K):
        if r < c:
            row.append(BOC)
        elif frames is not None and r >= c + frames:
            row.append(EOC)
        else:
            choices = logits[c].clone()
            choices[BOC] = float("-inf")
            if c or frames is not None:
                choices[EOC] = float("-inf")
            row.append(int(choices.argmax()))
    return np.array(row)


def _greedy_without_cache(model, prompt: np.ndarray, ref_rows: np.ndarray, pad: int, max_frames: int) -> np.ndarray:
    rows, frames, r = [], None, 0
    while True:
        ids = torch.tensor(np.concatenate([prompt, np.full(len(rows), -100)]))[None]
        audio = ids == -100
        fed = np.concatenate([ref_rows, np.array(rows, np.int64).reshape(-1, K)])
        logits = model(ids.masked_fill(audio, pad), torch.ones_like(ids), torch.tensor(fed), audio).audio_logits
        row = _masked_argmax(logits[0, -1], r, frames)
        if frames is None and (row[0] == EOC or r == max_frames):
            frames, row[0] = r, EOC
        rows.append(row)
        if frames is not None and r == frames + 6:
            break
        r += 1
    rows = np.array(rows)
    return np.stack([rows[c : c + frames, c] for c in range(K)])


def _prompt(tok, with_reference: bool):
    enc = V3SampleEncoder(tok)
    ref = np.random.default_rng(0).integers(0, 1024, (K, 5)) if with_reference else None
    return enc.prompt("Hello there.", "A reference." if with_reference else None, ref)


@pytest.mark.parametrize("with_reference", [False, True], ids=["zero-shot", "cloning"])
def test_cached_greedy_loop_equals_recomputing_every_step(tiny_v3, tok, with_reference):
    model = load_v3_model(tiny_v3).eval()
    prompt, ref_rows = _prompt(tok, with_reference)
    with torch.no_grad():
        codes = generate_v3_codes(model, prompt.tolist(), ref_rows, pad_id=tok.pad_token_id, max_new_frames=12,
                                  temperature=0)  # fmt: skip
        expected = _greedy_without_cache(model, prompt, ref_rows, tok.pad_token_id, 12)
    assert codes.shape == (K, 12) and codes.max() < 1024  # a random model does not end by itself here
    np.testing.assert_array_equal(codes, expected)


def test_audio_ends_when_codebook_0_emits_eoc(tiny_v3, tok):
    from higgs_ds.models.v3.delay import apply_v3_delay

    model = load_v3_model(tiny_v3).eval()
    prompt, _ = _prompt(tok, False)
    with torch.no_grad():  # point codebook 0's EOC row at the hidden state of the 10th audio position
        codes = generate_v3_codes(model, prompt.tolist(), None, pad_id=tok.pad_token_id, max_new_frames=40,
                                  temperature=0)  # fmt: skip
        rows = apply_v3_delay(codes)
        ids = torch.from_numpy(np.concatenate([prompt, np.full(len(rows), -100)]))[None]
        audio = ids == -100
        hidden = model(ids.masked_fill(audio, 0), None, torch.from_numpy(rows), audio).last_hidden_state[0]
        target = hidden[len(prompt) + 10]
        model.fused.weight[EOC] = 0.8 * target / target.norm() ** 2  # measured: ends after 6 frames
        codes = generate_v3_codes(model, prompt.tolist(), None, pad_id=tok.pad_token_id, max_new_frames=40,
                                  temperature=0)  # fmt: skip
        expected = _greedy_without_cache(model, prompt, np.zeros((0, K), np.int64), tok.pad_token_id, 40)
    assert 0 < codes.shape[1] < 40, "the edit did not make the model end inside the audio: the test checks nothing"
    np.testing.assert_array_equal(codes, expected)
    assert model.state_dict()[FUSED_TABLE][EOC].abs().sum() > 0


def test_sampling_is_repeatable_per_seed(tiny_v3, tok):
    model = load_v3_model(tiny_v3).eval()
    prompt, _ = _prompt(tok, False)
    with torch.no_grad():
        a, b, c = (generate_v3_codes(model, prompt.tolist(), None, pad_id=tok.pad_token_id, max_new_frames=6, seed=s)
                   for s in (5, 5, 6))  # fmt: skip
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_synthesis_record_prompts_with_the_training_prompts_prefix(tok):
    from higgs_ds.eval.synth_request import Reference, SynthRequest, prompt_record

    ref_codes = np.random.default_rng(1).integers(0, 1024, (K, 4))
    request = SynthRequest("x", "Say this.", (Reference("ref.wav", "What the reference says."),), None, "sys", 0)
    prompt, rows = record_prompt(prompt_record(request, [ref_codes], K), tok)
    want, want_rows = V3SampleEncoder(tok).prompt("Say this.", "What the reference says.", ref_codes)
    np.testing.assert_array_equal(prompt, want)
    np.testing.assert_array_equal(rows, want_rows)
    ids = tok.convert_tokens_to_ids
    assert prompt[0] == ids("<|tts|>") and prompt[-1] == ids("<|audio|>") and (prompt == -100).sum() == 4 + 7
