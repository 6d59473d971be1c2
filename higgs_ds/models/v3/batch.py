"""V3Samples -> the Higgs TTS 3 model's batch, with the audio labels of higgs_ds.train.loss.higgs_loss.

The batch contract (all torch tensors; B samples, S positions right-padded to a multiple of `round_to`):

    input_ids        (B, S) int64  the prompts' text ids; audio slots and padding hold the pad id
                                   (<|endoftext|>), never read by the model at the slots
    attention_mask   (B, S) int64  1 real, 0 pad
    audio_in_mask    (B, S) bool   the slots (reference and target), whose input is a delayed row's fused
                                   embedding
    audio_in_codes   (M, 8) int64  those rows, in row-major order of audio_in_mask (values 0..1025)
    audio_out_mask   (B, S) bool   per sample the <|audio|> position and the T + 7 target slots: T + 8
                                   positions whose audio logits the loss reads, row-major = label columns
    label_audio_ids  (8, N) int64  per sample [-100, row 0, ..., row T + 6] with BOC cells -100: column j's
                                   logits predict column j + 1, so higgs_loss's one global shift never
                                   crosses samples (each segment's first column is -100)
    label_ids/labels (B, S) int64  all -100: v3 trains audio only
    sample_ids       list

Vectorised over the batch with numpy (it is on the data path): the labels are read from audio_in_codes
through the slots' running count, so no per-position Python loop and no second copy of the rows.
"""

from __future__ import annotations

import numpy as np
import torch

from higgs_ds.errors import UserError
from higgs_ds.models.v3.delay import BOC, EOC, IGNORE, NUM_CODEBOOKS, v3_labels
from higgs_ds.models.v3.tokenizer import EOS, special_ids

BATCH_KEYS = (
    "input_ids",
    "attention_mask",
    "audio_in_mask",
    "audio_in_codes",
    "audio_out_mask",
    "label_audio_ids",
    "label_ids",
    "labels",
    "sample_ids",
)


def _checked_geometry(config_or_geometry):
    """The v3 config (num_codebooks, codebook_size) or a models.interface.Geometry, checked against the
    delay pattern's 8 codebooks and BOC 1024 / EOC 1025, which the encoder lays out."""
    from higgs_ds.models.interface import Geometry, geometry

    g = config_or_geometry if isinstance(config_or_geometry, Geometry) else geometry(config_or_geometry)
    if (g.num_codebooks, g.stream_bos, g.stream_eos) != (NUM_CODEBOOKS, BOC, EOC):
        raise UserError(
            f"the model has {g.num_codebooks} codebooks with BOC {g.stream_bos} / EOC {g.stream_eos}; Higgs TTS 3 "
            f"prompts are laid out for {NUM_CODEBOOKS} with {BOC} / {EOC}: use the model directory's own config"
        )
    return g


class V3Collator:
    """V3Samples -> HiggsTTS3ForConditionalGeneration's batch (+ audio labels), see the module doc.
    `round_to` 1 gives an unpadded layout."""

    def __init__(self, model_config_or_geometry, tokenizer, round_to: int = 8):
        _checked_geometry(model_config_or_geometry)
        self.pad = special_ids(tokenizer)[EOS]
        self.round_to = round_to

    def __call__(self, samples: list) -> dict:
        if not samples:
            raise ValueError("empty micro-batch")
        batch_size = len(samples)
        lengths = np.array([len(s.input_ids) for s in samples], np.int64)
        width = -(-int(lengths.max()) // self.round_to) * self.round_to
        ids = np.concatenate([s.input_ids for s in samples]).astype(np.int64, copy=False)
        row = np.repeat(np.arange(batch_size), lengths)
        # each token's cell in the flat (B * S) batch: its row's start plus its place in the sample
        flat = np.arange(len(ids)) + (row * width - (np.cumsum(lengths) - lengths)[row])
        is_slot = ids == IGNORE

        input_ids = np.full(batch_size * width, self.pad, np.int64)
        input_ids[flat[~is_slot]] = ids[~is_slot]
        attention = np.zeros(batch_size * width, np.int64)
        attention[flat] = 1
        in_mask = np.zeros(batch_size * width, bool)
        in_mask[flat[is_slot]] = True
        codes = np.concatenate([s.slot_rows for s in samples]).astype(np.int64, copy=False)
        self._check(samples, is_slot, row, codes)

        out_pos = self._out_positions(samples, width)
        out_mask = np.zeros(batch_size * width, bool)
        out_mask[out_pos] = True
        # the row of an out position that is a slot is the slot's input row: its label
        slot_number = np.cumsum(in_mask) - 1
        labelled = in_mask[out_pos]
        labels = np.full((len(out_pos), NUM_CODEBOOKS), IGNORE, np.int64)
        labels[labelled] = v3_labels(codes[slot_number[out_pos[labelled]]])

        all_ignored = torch.full((batch_size, width), IGNORE, dtype=torch.long)
        return {
            "input_ids": torch.from_numpy(input_ids.reshape(batch_size, width)),
            "attention_mask": torch.from_numpy(attention.reshape(batch_size, width)),
            "audio_in_mask": torch.from_numpy(in_mask.reshape(batch_size, width)),
            "audio_in_codes": torch.from_numpy(np.ascontiguousarray(codes)),
            "audio_out_mask": torch.from_numpy(out_mask.reshape(batch_size, width)),
            "label_audio_ids": torch.from_numpy(np.ascontiguousarray(labels.T)),
            "label_ids": all_ignored,
            "labels": all_ignored,
            "sample_ids": [s.sample_id for s in samples],
        }

    @staticmethod
    def _out_positions(samples, width: int) -> np.ndarray:
        """Flat positions of every sample's T + 8 trained positions (<|audio|> and the target slots)."""
        seg_len = np.array([s.out_frames + NUM_CODEBOOKS for s in samples], np.int64)
        first = np.array([s.out_start for s in samples], np.int64) + np.arange(len(samples)) * width
        before = np.cumsum(seg_len) - seg_len
        return np.arange(int(seg_len.sum())) + np.repeat(first - before, seg_len)

    @staticmethod
    def _check(samples, is_slot, row, codes) -> None:
        """One row per slot, and each sample ends with its <|audio|> then its T + 7 target slots."""
        slots = np.bincount(row[is_slot], minlength=len(samples))
        for s, n in zip(samples, slots.tolist()):
            n_out = s.out_frames + NUM_CODEBOOKS - 1
            if (
                n != len(s.slot_rows)
                or s.out_start + 1 + n_out != len(s.input_ids)
                or s.input_ids[s.out_start] == IGNORE
                or n < n_out
                or not (s.input_ids[s.out_start + 1 :] == IGNORE).all()
            ):
                raise ValueError(
                    f"sample {s.sample_id!r}: {n} audio slots, {len(s.slot_rows)} rows, <|audio|> at {s.out_start} "
                    f"of {len(s.input_ids)} positions for {s.out_frames} frames: not a V3SampleEncoder sample"
                )
        if codes.ndim != 2 or codes.shape[1] != NUM_CODEBOOKS:
            raise ValueError(f"slot rows of shape {codes.shape}, expected (M, {NUM_CODEBOOKS})")
