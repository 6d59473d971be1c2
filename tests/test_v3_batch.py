"""The Higgs TTS 3 collator (higgs_ds.models.v3.batch): the batch contract, and higgs_loss on it against a
by-hand per-codebook CE computed from the delayed rows directly."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from higgs_ds.errors import UserError
from higgs_ds.models.interface import Geometry
from higgs_ds.models.v3.batch import BATCH_KEYS, V3Collator
from higgs_ds.models.v3.prompt import V3Sample, V3SampleEncoder
from higgs_ds.models.v3.tokenizer import build_tiny_v3_tokenizer
from higgs_ds.train.loss import higgs_loss
from tests.test_v3_prompt import clone_record, delayed_by_hand, record

B, E, X = 1024, 1025, -100
V3_CONFIG = SimpleNamespace(model_type="higgs_multimodal_qwen3", num_codebooks=8, codebook_size=1026)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_v3_tokenizer()


@pytest.fixture(scope="module")
def enc(tok):
    return V3SampleEncoder(tok)


@pytest.fixture(scope="module")
def collate(tok):
    return V3Collator(V3_CONFIG, tok)


def test_keys_padding_and_masks_of_two_lengths(tok, enc, collate):
    short, long = enc(record("a", "Hi.", 2, seed=1)), enc(record("b", "A longer text here.", 5, seed=2))
    batch = collate([short, long])
    assert tuple(batch) == BATCH_KEYS and batch["sample_ids"] == ["a", "b"]
    lengths = [len(short.input_ids), len(long.input_ids)]
    assert lengths == [3 + 3 + 9, 3 + 19 + 12]  # <|tts|><|text|> text <|audio|>, then T + 7 slots
    assert batch["input_ids"].shape == (2, 40)  # 34 rounded up to 8
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    for i, sample in enumerate((short, long)):
        n, start = lengths[i], sample.out_start
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (40 - n)
        expected_ids = sample.input_ids.tolist()[: start + 1] + [pad] * (40 - start - 1)
        assert batch["input_ids"][i].tolist() == expected_ids
        assert batch["audio_in_mask"][i].tolist() == [False] * (start + 1) + [True] * (n - start - 1) + [False] * (
            40 - n
        )
        out = [False] * start + [True] * (sample.out_frames + 8) + [False] * (40 - n)
        assert batch["audio_out_mask"][i].tolist() == out
    for key, dtype in [("input_ids", torch.long), ("attention_mask", torch.long), ("audio_in_mask", torch.bool)]:
        assert batch[key].dtype == dtype
    assert batch["audio_in_codes"].dtype == torch.long and batch["label_audio_ids"].dtype == torch.long
    np.testing.assert_array_equal(batch["audio_in_codes"].numpy(), np.concatenate([short.slot_rows, long.slot_rows]))
    assert (batch["label_ids"] == X).all() and (batch["labels"] == X).all()
    assert batch["label_ids"].shape == (2, 40)


def test_labels_cell_by_cell_on_one_frame(tok):
    rec = record("one", "x", 1)
    rec["codes"] = np.arange(500, 508)[:, None]
    batch = V3Collator(V3_CONFIG, tok, round_to=1)([V3SampleEncoder(tok)(rec)])
    expected = np.array(
        [  # column 0 (<|audio|>) ignored, then rows 0..7: BOC ignored, EOC trained
            [X, 500, E, E, E, E, E, E, E],
            [X, X, 501, E, E, E, E, E, E],
            [X, X, X, 502, E, E, E, E, E],
            [X, X, X, X, 503, E, E, E, E],
            [X, X, X, X, X, 504, E, E, E],
            [X, X, X, X, X, X, 505, E, E],
            [X, X, X, X, X, X, X, 506, E],
            [X, X, X, X, X, X, X, X, 507],
        ]
    )
    np.testing.assert_array_equal(batch["label_audio_ids"].numpy(), expected)
    assert batch["input_ids"].shape == (1, 3 + 1 + 8)  # round_to 1: no padding


def test_cloning_and_plain_in_one_batch(enc, collate):
    target, ref = record("t", "Clone me.", 3, seed=3), record("r", "Reference.", 4, seed=4)
    clone, plain = enc(clone_record(target, ref)), enc(record("p", "Plain.", 2, seed=5))
    batch = collate([clone, plain])
    in_mask, out_mask = batch["audio_in_mask"], batch["audio_out_mask"]
    assert in_mask[0].sum() == (4 + 7) + (3 + 7) and in_mask[1].sum() == 2 + 7
    assert out_mask[0].sum() == 3 + 8 and out_mask[1].sum() == 2 + 8
    ref_slots = in_mask[0] & ~out_mask[0]
    assert ref_slots.sum() == 4 + 7  # the reference is input only
    np.testing.assert_array_equal(
        batch["audio_in_codes"].numpy(),
        np.concatenate([delayed_by_hand(ref["codes"]), delayed_by_hand(target["codes"]), plain.slot_rows]),
    )
    assert batch["label_audio_ids"].shape == (8, (3 + 8) + (2 + 8))


def test_label_columns_line_up_with_out_positions(enc, collate):
    samples = [
        enc(clone_record(record("t", "Clone me.", 3, seed=3), record("r", "Ref.", 4, seed=4))),
        enc(record("p", "Plain text.", 6, seed=5)),
    ]
    batch = collate(samples)
    in_flat, out_flat = batch["audio_in_mask"].flatten(), batch["audio_out_mask"].flatten()
    rows_at = {p: row for p, row in zip(torch.nonzero(in_flat)[:, 0].tolist(), batch["audio_in_codes"].numpy())}
    labels = batch["label_audio_ids"].numpy()
    audio = batch["input_ids"].flatten()[out_flat]
    for column, position in enumerate(torch.nonzero(out_flat)[:, 0].tolist()):
        if position in rows_at:  # a target slot: its label is its own delayed row, BOC ignored
            row = rows_at[position]
            np.testing.assert_array_equal(labels[:, column], np.where(row == B, X, row))
        else:  # the <|audio|> position: the segment's first column
            assert audio[column] == enc.audio and (labels[:, column] == X).all()


def test_higgs_loss_equals_per_codebook_ce_from_the_delayed_rows(enc, collate):
    recs = [record("a", "First.", 3, seed=6), record("b", "Second, longer.", 7, seed=7)]
    batch = collate([enc(r) for r in recs])
    n = int(batch["audio_out_mask"].sum())
    audio_logits = torch.randn(n, 8, 1026, generator=torch.Generator().manual_seed(0))
    text_logits = torch.zeros((*batch["label_ids"].shape, 1))
    total, metrics = higgs_loss(text_logits, batch["label_ids"], audio_logits, batch["label_audio_ids"])

    # by hand: sample i's logits are its T + 8 out positions in order; the one at offset k predicts delayed
    # row k (the <|audio|> position row 0), BOC targets skipped, the last position predicts nothing
    sums, counts, offset = torch.zeros(8, dtype=torch.float64), torch.zeros(8), 0
    for rec in recs:
        rows = delayed_by_hand(rec["codes"])
        for k, row in enumerate(rows):
            for c in range(8):
                if row[c] != B:
                    target = torch.tensor([int(row[c])])
                    sums[c] += F.cross_entropy(audio_logits[offset + k, c][None], target).double()
                    counts[c] += 1
        offset += len(rows) + 1
    assert offset == n
    per_codebook = sums / counts
    for c in range(8):
        assert metrics[f"audio_loss_cb{c}"].item() == pytest.approx(per_codebook[c].item(), rel=1e-5)
    assert total.item() == pytest.approx(per_codebook.mean().item(), rel=1e-5)
    assert metrics["text_loss"].item() == 0.0


def test_geometry_is_checked(tok):
    V3Collator(Geometry(8, 1024, 1024, 1025), tok)
    with pytest.raises(UserError, match="9 codebooks"):
        V3Collator(Geometry(9, 1024, 1024, 1025), tok)


def test_inconsistent_sample_is_refused_by_name(enc, collate):
    good = enc(record("g", "Fine.", 2))
    bad = V3Sample("broken", good.input_ids, good.slot_rows[:-1], good.out_start, good.out_frames)
    with pytest.raises(ValueError, match="'broken'"):
        collate([good, bad])
    with pytest.raises(ValueError, match="empty"):
        collate([])
