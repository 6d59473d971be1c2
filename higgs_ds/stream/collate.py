"""Stage 7 of the data flow: EncodedSamples -> one model batch, exactly as boson's HiggsAudioSampleCollator
makes it with the released model's settings (delay pattern on, Whisper off, audio-in as codes), read from
the model config so a checkpoint trained otherwise is collated its own way.

Two implementations of the same function:

* "fast" (default): the whole batch in a few numpy operations. boson's collator builds the delay pattern
  one audio segment at a time with a dozen small torch ops each, which was half of the stream's time.
* "boson": boson's own HiggsAudioSampleCollator, the reference.

The fast collator checks itself against boson's on the first `check_batches` batches it makes in every
process (a few milliseconds), and the tests compare the two on cloning, dialogue, untrained and
audio-less samples, so a divergence is an error, never a silently different training signal.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

IGNORE = -100


def _refuse_whisper(model_config) -> None:
    if model_config.encode_whisper_embed:
        raise ValueError(
            "this model config sets encode_whisper_embed=True (a Whisper audio tower); higgs-ds "
            "trains the released generation model, which reads audio as codes only"
        )


def make_collator(model_config, round_to: int = 8):
    from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator

    _refuse_whisper(model_config)
    return HiggsAudioSampleCollator(
        whisper_processor=None,
        audio_in_token_id=model_config.audio_in_token_idx,
        audio_out_token_id=model_config.audio_out_token_idx,
        pad_token_id=model_config.pad_token_id,
        audio_stream_bos_id=model_config.audio_stream_bos_id,
        audio_stream_eos_id=model_config.audio_stream_eos_id,
        round_to=round_to,
        pad_left=False,
        encode_whisper_embed=False,
        return_audio_in_tokens=model_config.encode_audio_in_tokens,
        audio_num_codebooks=model_config.audio_num_codebooks,
        use_delay_pattern=model_config.use_delay_pattern,
    )


# What HiggsAudioModel.forward takes from a batch; the rest (labels, sample_ids) is for the trainer.
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "audio_features",
    "audio_feature_attention_mask",
    "audio_in_ids",
    "audio_in_ids_start",
    "audio_out_ids",
    "audio_out_ids_start",
    "audio_out_ids_start_group_loc",
    "label_ids",
    "label_audio_ids",
    "reward",
)


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def boson_collate(collator, samples: list) -> dict:
    collated = collator([s.to_chatml() for s in samples])
    return {f.name: getattr(collated, f.name) for f in dataclasses.fields(collated)}  # no deep copy


def _segments(segments: list, bos: int, eos: int, delay: bool, trained: list | None = None):
    """All audio segments of a batch, each framed as [bos, codes, eos] (labels: [-100, codes, eos], all -100
    when not trained) and, with the delay pattern, row k shifted right by k (bos before, eos after, -100
    around the labels), concatenated along time: what boson's collator builds segment by segment with a
    dozen torch ops each, here with one copy per segment (two when trained) into a view already delayed.
    Returns (ids, labels or None, segment lengths)."""
    num_codebooks = segments[0].shape[0]
    delay_cols = num_codebooks - 1 if delay else 0
    frames = np.array([seg.shape[1] for seg in segments], np.int64)
    seg_len = frames + 2 + delay_cols
    seg_start = np.cumsum(seg_len) - seg_len
    width = int(seg_len.sum())
    ids, ids_undelayed = _delayed(num_codebooks, width, eos, delay)
    labels = labels_undelayed = None
    if trained is not None:
        labels, labels_undelayed = _delayed(num_codebooks, width, IGNORE, delay)
    for i, seg in enumerate(segments):
        o = int(seg_start[i]) + 1
        ids_undelayed[:, o : o + seg.shape[1]] = seg
        if labels is not None and trained[i]:
            labels_undelayed[:, o : o + seg.shape[1]] = seg
    if labels is not None and any(trained):
        labels_undelayed[:, (seg_start + 1 + frames)[np.asarray(trained, bool)]] = eos  # after each trained seg
    # the leading bos cells of every segment: row k holds k + 1 of them with the delay, 1 without
    bos_rows, bos_offsets = _bos_cells(num_codebooks, delay)
    ids.reshape(-1)[(bos_rows * width)[None, :] + seg_start[:, None] + bos_offsets[None, :]] = bos
    return ids, labels, seg_len


def _delayed(rows: int, width: int, fill: int, delay: bool) -> tuple[np.ndarray, np.ndarray]:
    """A (rows, width) int64 array of `fill`, and a view of it in which column c of row k is its column c + k
    (with the delay): writing the undelayed layout into the view writes the delayed one, without a shifted
    copy. View row k runs past the end of its row into the first k cells of row k + 1 (and row rows - 1 into
    `rows` spare cells); the undelayed layout's last rows - 1 columns are always `fill` (the last segment's
    tail), so those cells keep the fill the delay gives them, as does the one cell between view rows."""
    if not delay:
        out = np.full((rows, width), fill, np.int64)
        return out, out
    buffer = np.full(rows * width + rows, fill, np.int64)
    view = np.lib.stride_tricks.as_strided(buffer, shape=(rows, width), strides=((width + 1) * 8, 8))
    return buffer[: rows * width].reshape(rows, width), view


@functools.lru_cache(maxsize=8)
def _bos_cells(num_codebooks: int, delay: bool) -> tuple[np.ndarray, np.ndarray]:
    cells = np.tri(num_codebooks, dtype=bool) if delay else np.ones((num_codebooks, 1), dtype=bool)
    return np.nonzero(cells)


class FastCollator:
    """The function of boson's HiggsAudioSampleCollator for this model config, vectorised over the batch."""

    def __init__(self, model_config):
        _refuse_whisper(model_config)
        c = model_config
        self.audio_in, self.audio_out, self.pad = c.audio_in_token_idx, c.audio_out_token_idx, c.pad_token_id
        self.bos, self.eos = c.audio_stream_bos_id, c.audio_stream_eos_id
        self.num_codebooks, self.delay = c.audio_num_codebooks, bool(c.use_delay_pattern)
        self.return_audio_in = bool(c.encode_audio_in_tokens)

    def __call__(self, samples: list) -> dict:
        lengths = [len(s.input_ids) for s in samples]
        width = -(-max(lengths) // 8) * 8
        input_ids = np.full((len(samples), width), self.pad, np.int64)
        label_ids = np.full((len(samples), width), IGNORE, np.int64)
        attention_mask = np.zeros((len(samples), width), np.int64)
        for b, s in enumerate(samples):
            input_ids[b, : lengths[b]], label_ids[b, : lengths[b]], attention_mask[b, : lengths[b]] = (
                s.input_ids,
                s.label_ids,
                1,
            )
        # one placeholder token per audio item; row-major order is boson's order (sample, then position)
        is_out = input_ids == self.audio_out
        is_audio = is_out | (input_ids == self.audio_in)
        per_sample = is_audio.sum(axis=1)
        for s, n in zip(samples, per_sample.tolist()):
            if n != len(s.frames):
                raise ValueError(
                    f"sample {s.sample_id!r}: {n} audio placeholders in its tokens, {len(s.frames)} audio items"
                )
        out_trained = (label_ids[is_out] >= 0).tolist()  # an audio-out segment is trained iff its token's label is
        label_ids[is_out] = IGNORE  # the <|AUDIO_OUT|> token itself is never a target
        kinds = is_out[is_audio].tolist()
        in_codes, out_codes, i = [], [], 0
        for s in samples:
            start = 0
            for t in s.frames:
                (out_codes if kinds[i] else in_codes).append(s.codes[: self.num_codebooks, start : start + t])
                start, i = start + t, i + 1
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "label_ids": torch.from_numpy(label_ids),
            "reward": torch.zeros(0, dtype=torch.float32),
        }
        if self.return_audio_in:
            batch["audio_in_ids"], _, batch["audio_in_ids_start"] = self._stack(in_codes)
        out = self._stack(out_codes, trained=out_trained)
        batch["audio_out_ids"], batch["label_audio_ids"], batch["audio_out_ids_start"] = out
        # boson records one group location per sample (not per segment); kept identical
        batch["audio_out_ids_start_group_loc"] = torch.arange(len(samples)) if out_codes else None
        return batch

    def _stack(self, codes: list, trained=None):
        """(ids, labels when `trained` is given, segment starts) of a list of segments."""
        if not codes:
            empty = torch.zeros((0, 0), dtype=torch.long)
            return empty, (empty.clone() if trained is not None else None), torch.zeros(0, dtype=torch.long)
        ids, labels, seg_len = _segments(codes, self.bos, self.eos, self.delay, trained)
        starts = torch.from_numpy(np.cumsum(seg_len) - seg_len)
        return torch.from_numpy(ids), None if labels is None else torch.from_numpy(labels), starts


def batches_equal(a: dict, b: dict) -> list[str]:
    """Keys whose values differ (tensor values, dtypes, shapes, or None-ness) between two batches."""
    differ = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x is None or y is None:
            if not (x is None and y is None):
                differ.append(key)
        elif x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            differ.append(key)
    return differ


class BatchCollator:
    """EncodedSamples -> the dict a HF-style trainer passes to forward.

    `labels` is the unexpanded text labels, kept because HF/SWIFT trainers expect the key; the loss
    uses the model's expanded labels instead (see higgs_ds.train.loss). `sample_ids` names the samples."""

    def __init__(self, model_config, mode: str = "fast", check_batches: int = 1):
        if mode not in ("fast", "boson"):
            raise ValueError(f"collator {mode!r}: use 'fast' or 'boson'")
        self.boson = make_collator(model_config)
        self.fast = FastCollator(model_config) if mode == "fast" else None
        self.check_batches = check_batches if mode == "fast" else 0

    def __call__(self, samples: list) -> dict:
        if not samples:
            raise ValueError("empty micro-batch")
        if self.fast is None:
            batch = boson_collate(self.boson, samples)
        else:
            batch = self.fast(samples)
            if self.check_batches > 0:
                self.check_batches -= 1
                differ = batches_equal(batch, boson_collate(self.boson, samples))
                if differ:
                    raise RuntimeError(
                        f"the fast collator disagrees with boson's HiggsAudioSampleCollator on {differ} for samples "
                        f"{[s.sample_id for s in samples]}; train with data.collator = 'boson' and report this"
                    )
        batch["labels"] = batch["label_ids"]
        batch["sample_ids"] = [s.sample_id for s in samples]
        return {k: v for k, v in batch.items() if v is not None}
