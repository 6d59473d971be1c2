"""EncodedSamples -> the native model's batch, with boson's training labels.

An EncodedSample holds boson's prepare_chatml_sample tokens: ONE placeholder per audio item (<|AUDIO|> for
audio-in, <|AUDIO_OUT|> for audio-out) and the item's raw codes. Boson's model expands each placeholder
inside its forward into the T + K + 1 columns of the framed, delayed segment; the native model takes that
expansion as its input instead (the processor's layout):

    input_ids             each audio item of T frames -> (T + 2) x audio_token_id, (K - 1) x audio_delay_token_id
                          (audio-in items too: the native model embeds and routes every placeholder alike, as
                          boson does with audio_in_discrete_codes_mask | audio_out_mask); right-padded with
                          pad_token_id to a multiple of `round_to`, like boson's training batch
    audio_input_ids       (B, F, K): each sample's items in order, framed [stream BOS, codes, stream EOS] and
                          delayed exactly as boson's collator frames a segment (higgs_ds.stream.collate's
                          `_segments`, checked against boson's collator); right-padded with stream EOS
    label_ids / labels    boson's *expanded* text labels: the sample's labels on text tokens, -100 on audio
    label_audio_ids       (K, N): boson's collator's labels of the audio-out segments ([-100, codes, EOS],
                          delayed; all -100 for an untrained segment), the N columns of audio_out_mask
    audio_out_mask        (B, S): the audio-out positions, row-major = the columns of label_audio_ids

So higgs_ds.train.loss.higgs_loss(text_logits, label_ids, audio_logits, label_audio_ids) is the same loss on
both families. Vectorised over the batch with numpy: it is on the data path.
"""

from __future__ import annotations

import numpy as np
import torch

from higgs_ds.errors import UserError
from higgs_ds.stream.collate import _segments

IGNORE = -100

# What the collator returns: the model's inputs (logits.NATIVE_MODEL_INPUTS), the loss's labels, names.
BATCH_KEYS = (
    "input_ids",
    "attention_mask",
    "audio_input_ids",
    "audio_input_ids_mask",
    "label_ids",
    "labels",
    "label_audio_ids",
    "audio_out_mask",
    "sample_ids",
)


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise UserError(f"the tokenizer has no {token} token: not a Higgs-Audio v2 (Llama-3) tokenizer")
    return token_id


class NativeCollator:
    """EncodedSamples -> HiggsAudioV2ForConditionalGeneration's batch (+ boson's labels), see the module doc.
    `round_to` 1 gives an unpadded layout (a generation prompt)."""

    def __init__(self, model_config, tokenizer, round_to: int = 8):
        c = model_config
        self.num_codebooks = c.num_codebooks
        self.audio_token, self.delay_token, self.pad = c.audio_token_id, c.audio_delay_token_id, c.pad_token_id
        self.bos, self.eos = c.audio_stream_bos_id, c.audio_stream_eos_id
        self.audio_in = _token_id(tokenizer, "<|AUDIO|>")
        self.audio_out = _token_id(tokenizer, "<|AUDIO_OUT|>")
        if self.audio_out != self.audio_token:
            raise UserError(
                f"the tokenizer's <|AUDIO_OUT|> is {self.audio_out}, the model config's audio_token_id "
                f"{self.audio_token}: use the model directory's own tokenizer"
            )
        self.round_to = round_to

    def __call__(self, samples: list) -> dict:
        if not samples:
            raise ValueError("empty micro-batch")
        ids = np.concatenate([np.asarray(s.input_ids, np.int64) for s in samples])
        labels = np.concatenate([np.asarray(s.label_ids, np.int64) for s in samples])
        row = np.repeat(np.arange(len(samples)), [len(s.input_ids) for s in samples])  # sample of each token
        is_out = ids == self.audio_out
        is_audio = is_out | (ids == self.audio_in)
        frames = self._frames(samples, np.bincount(row[is_audio], minlength=len(samples)))
        seg_len = frames + self.num_codebooks + 1  # framed (T + 2) and delayed (K - 1)
        batch = self._text(ids, labels, row, is_audio, is_out, frames, seg_len, len(samples))
        # an audio-out segment is trained iff its placeholder's label is (boson's audio_out_no_train_flag)
        trained = (is_out & (labels >= 0))[is_audio]
        batch.update(self._audio(samples, row[is_audio], is_out[is_audio], trained, seg_len))
        batch["labels"] = batch["label_ids"]
        batch["sample_ids"] = [s.sample_id for s in samples]
        return batch

    def _frames(self, samples: list, placeholders: np.ndarray) -> np.ndarray:
        """Frame counts of every audio item of the batch, in placeholder order (sample, then position)."""
        for s, n in zip(samples, placeholders.tolist()):
            if n != len(s.frames):
                raise ValueError(
                    f"sample {s.sample_id!r}: {n} audio placeholders in its tokens, {len(s.frames)} audio items"
                )
            if s.frames and (s.codes.shape[0] < self.num_codebooks or s.codes.shape[1] != sum(s.frames)):
                raise ValueError(
                    f"sample {s.sample_id!r}: codes of shape {tuple(s.codes.shape)} for {self.num_codebooks} "
                    f"codebooks and {sum(s.frames)} frames"
                )
        return np.array([t for s in samples for t in s.frames], np.int64)

    def _text(self, ids, labels, row, is_audio, is_out, frames, seg_len, batch_size) -> dict:
        """input_ids, attention_mask, label_ids, audio_out_mask (B, S): every placeholder token repeated over
        its segment's columns, then the segment's last K - 1 columns made delay tokens."""
        repeat = np.ones(len(ids), np.int64)
        repeat[is_audio] = seg_len
        flat_ids, flat_labels = np.repeat(ids, repeat), np.repeat(labels, repeat)
        flat_audio, flat_out, flat_row = np.repeat(is_audio, repeat), np.repeat(is_out, repeat), np.repeat(row, repeat)
        flat_ids[flat_audio] = self.audio_token
        flat_labels[flat_audio] = IGNORE  # no text target on audio, the placeholder's own label included
        seg_start = (np.cumsum(repeat) - repeat)[is_audio]
        flat_ids[((seg_start + frames + 2)[:, None] + np.arange(self.num_codebooks - 1)).ravel()] = self.delay_token
        lengths = np.bincount(flat_row, minlength=batch_size)
        width = -(-int(lengths.max()) // self.round_to) * self.round_to
        col = np.arange(len(flat_ids)) - (np.cumsum(lengths) - lengths)[flat_row]
        input_ids = np.full((batch_size, width), self.pad, np.int64)
        label_ids = np.full((batch_size, width), IGNORE, np.int64)
        attention_mask = np.zeros((batch_size, width), np.int64)
        audio_out_mask = np.zeros((batch_size, width), bool)
        input_ids[flat_row, col], label_ids[flat_row, col], attention_mask[flat_row, col] = flat_ids, flat_labels, 1
        audio_out_mask[flat_row, col] = flat_out
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "label_ids": torch.from_numpy(label_ids),
            "audio_out_mask": torch.from_numpy(audio_out_mask),
        }

    def _audio(self, samples, item_row, item_out, trained, seg_len) -> dict:
        """audio_input_ids (B, F, K) + mask: every item's framed, delayed segment, in the sample's order;
        label_audio_ids (K, N): the audio-out segments' labels, as boson's collator makes them."""
        k, batch_size = self.num_codebooks, len(samples)
        segments = []
        for s in samples:
            starts = np.cumsum([0, *s.frames])
            segments += [s.codes[:k, a:b] for a, b in zip(starts[:-1], starts[1:])]
        if not segments:  # a text-only batch: no frames (the model still runs its audio modules on none)
            return {
                "audio_input_ids": torch.zeros((batch_size, 0, k), dtype=torch.long),
                "audio_input_ids_mask": torch.zeros((batch_size, 0), dtype=torch.bool),
                "label_audio_ids": torch.zeros((0, 0), dtype=torch.long),
            }
        ids, seg_labels, _ = _segments(segments, self.bos, self.eos, True, trained.tolist())
        col_row = np.repeat(item_row, seg_len)
        per_sample = np.bincount(col_row, minlength=batch_size)
        col = np.arange(ids.shape[1]) - (np.cumsum(per_sample) - per_sample)[col_row]
        audio_input_ids = np.full((batch_size, int(per_sample.max()), k), self.eos, np.int64)
        mask = np.zeros(audio_input_ids.shape[:2], bool)
        audio_input_ids[col_row, col], mask[col_row, col] = ids.T, True
        out_cols = np.repeat(item_out, seg_len)
        # boson's collator gives (0, 0) when no segment is audio-out
        label_audio_ids = seg_labels[:, out_cols] if out_cols.any() else np.zeros((0, 0), np.int64)
        return {
            "audio_input_ids": torch.from_numpy(audio_input_ids),
            "audio_input_ids_mask": torch.from_numpy(mask),
            "label_audio_ids": torch.from_numpy(np.ascontiguousarray(label_audio_ids)),
        }
