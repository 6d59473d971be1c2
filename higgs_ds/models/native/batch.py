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
                          delayed exactly as boson's collator frames a segment (the layout of higgs_ds.stream.
                          collate's `_segments`, checked against boson's collator); right-padded with stream EOS
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
from higgs_ds.stream.collate import _bos_cells, _delayed

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
        lengths = np.array([len(s.input_ids) for s in samples], np.int64)
        ids = np.concatenate([s.input_ids for s in samples], dtype=np.int64)
        labels = np.concatenate([s.label_ids for s in samples], dtype=np.int64)
        row = np.repeat(np.arange(len(samples)), lengths)  # sample of each token
        is_out = ids == self.audio_out
        is_audio = is_out | (ids == self.audio_in)
        frames = self._frames(samples, np.bincount(row[is_audio], minlength=len(samples)))
        seg_len = frames + self.num_codebooks + 1  # framed (T + 2) and delayed (K - 1)
        batch = self._text(ids, labels, lengths, row, is_audio, is_out, frames, seg_len)
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

    def _text(self, ids, labels, lengths, row, is_audio, is_out, frames, seg_len) -> dict:
        """input_ids, attention_mask, label_ids, audio_out_mask (B, S). One np.repeat per array makes the
        padded rows directly: each token is repeated over its columns (a placeholder over its segment's),
        and a pad entry after each sample's tokens over the rest of its row; then the segments' last K - 1
        columns become delay tokens."""
        batch_size, k = len(lengths), self.num_codebooks
        repeat = np.ones(len(ids), np.int64)
        repeat[is_audio] = seg_len
        ends = np.cumsum(lengths)
        expanded = np.diff(np.concatenate(([0], np.cumsum(repeat)))[ends], prepend=0)
        width = -(-int(expanded.max()) // self.round_to) * self.round_to
        token_at = np.arange(len(ids)) + row  # place in the tokens with one pad entry after each sample
        pad_at = ends + np.arange(batch_size)
        spans = np.empty(len(ids) + batch_size, np.int64)
        spans[token_at], spans[pad_at] = repeat, width - expanded

        def rows(values, pad, dtype):
            entries = np.full(len(spans), pad, dtype)
            entries[token_at] = values
            return np.repeat(entries, spans).reshape(batch_size, width)

        input_ids = rows(np.where(is_audio, self.audio_token, ids), self.pad, np.int64)
        seg_start = (np.cumsum(spans) - spans)[token_at[is_audio]]
        delays = ((seg_start + frames + 2)[:, None] + np.arange(k - 1)).ravel()
        input_ids.reshape(-1)[delays] = self.delay_token
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(rows(1, 0, np.int64)),
            # no text target on audio, the placeholder's own label included
            "label_ids": torch.from_numpy(rows(np.where(is_audio, IGNORE, labels), IGNORE, np.int64)),
            "audio_out_mask": torch.from_numpy(rows(is_out, False, bool)),
        }

    def _audio(self, samples, item_row, item_out, trained, seg_len) -> dict:
        """audio_input_ids (B, F, K) + mask: every item's framed, delayed segment, in the sample's order;
        label_audio_ids (K, N): the audio-out segments' labels, as boson's collator makes them."""
        k, batch_size = self.num_codebooks, len(samples)
        segments = []
        for s in samples:
            if len(s.frames) == 1:
                segments.append(s.codes[:k])
                continue
            starts = np.cumsum([0, *s.frames]).tolist()
            segments += [s.codes[:k, a:b] for a, b in zip(starts[:-1], starts[1:])]
        if not segments:  # a text-only batch: no frames (the model still runs its audio modules on none)
            return {
                "audio_input_ids": torch.zeros((batch_size, 0, k), dtype=torch.long),
                "audio_input_ids_mask": torch.zeros((batch_size, 0), dtype=torch.bool),
                "label_audio_ids": torch.zeros((0, 0), dtype=torch.long),
            }
        per_sample = np.bincount(item_row, weights=seg_len, minlength=batch_size).astype(np.int64)
        frames_width = int(per_sample.max())
        # each segment's first column in the (B * F) frames of the batch: its sample's row, then its place
        seg_start = np.cumsum(seg_len) - seg_len
        seg_start += item_row * frames_width - (np.cumsum(per_sample) - per_sample)[item_row]
        audio_input_ids = _frame_major_segments(segments, seg_start, batch_size * frames_width, k, self.bos, self.eos)
        mask = np.arange(frames_width) < per_sample[:, None]
        label_audio_ids = np.zeros((0, 0), np.int64)  # boson's collator gives (0, 0) when no segment is audio-out
        if item_out.any():
            out = np.flatnonzero(item_out)
            out_len = seg_len[out]
            out_start = np.cumsum(out_len) - out_len
            label_audio_ids = _segment_labels(
                [segments[i] for i in out], out_start, int(out_len.sum()), trained[out].tolist(), self.eos
            )
        return {
            "audio_input_ids": torch.from_numpy(audio_input_ids.reshape(batch_size, frames_width, k)),
            "audio_input_ids_mask": torch.from_numpy(mask),
            "label_audio_ids": torch.from_numpy(label_audio_ids),
        }


def _frame_major_segments(segments, seg_start, width: int, k: int, bos: int, eos: int) -> np.ndarray:
    """(width, K) frames of stream EOS with each segment framed [BOS, codes, EOS] and delayed at its start
    column: codebook row r of a segment shifted r frames later, BOS before it. Written through a strided
    view in which (r, c) is frame c + r, codebook r, so each segment is one undelayed copy; the cells of
    that view past the last frame (the last segment's tail) are never written (see collate._delayed)."""
    buffer = np.full(width * k + k * k, eos, np.int64)
    view = np.lib.stride_tricks.as_strided(buffer, shape=(k, width), strides=((k + 1) * 8, k * 8))
    for seg, o in zip(segments, (seg_start + 1).tolist()):
        view[:, o : o + seg.shape[1]] = seg
    rows, offsets = _bos_cells(k, True)
    buffer[((seg_start[:, None] + offsets[None, :]) * k + rows[None, :]).ravel()] = bos
    return buffer[: width * k]


def _segment_labels(segments, seg_start, width: int, trained: list, eos: int) -> np.ndarray:
    """(K, width) labels of audio-out segments laid end to end: [-100, codes, EOS] delayed for a trained
    segment, all -100 for an untrained one (boson's collator's label_audio_ids)."""
    k = segments[0].shape[0]
    labels, view = _delayed(k, width, IGNORE, True)
    for seg, o, keep in zip(segments, (seg_start + 1).tolist(), trained):
        if keep:
            view[:, o : o + seg.shape[1]] = seg
            view[:, o + seg.shape[1]] = eos
    return labels
