"""Stage 6 of the data flow: a shard record -> boson's ChatMLDatasetSample.

Text goes through boson's own `prepare_chatml_sample` (Llama-3 headers, label masking by role and
start_index); the stored codes are split back into one (8, T_i) block per audio item, in the order
prepare_chatml_sample lists the audio items. Waveforms are not needed: the released model reads audio
in and out as codes only (encode_whisper_embed=False).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from higgs_ds.errors import UserError


class EncodingError(UserError):
    pass


def expanded_length(num_text_tokens: int, frames: list[int]) -> int:
    """Positions the model sees after expanding each audio placeholder to T_i + 9 positions (one of
    which was the placeholder itself), rounded up to the collator's multiple of 8."""
    n = num_text_tokens + sum(t + 8 for t in frames)
    return -(-n // 8) * 8


class SampleEncoder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, record: dict):
        import torch
        from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample

        meta = record["json"]
        chatml = {k: meta[k] for k in ("messages", "speaker", "start_index", "misc") if k in meta}
        # prepare_chatml_sample prints and returns Nones on error; keep its chatter out of the logs
        # and raise a named error instead.
        with contextlib.redirect_stdout(io.StringIO()) as chatter:
            input_ids, label_ids, audio_contents, _ = prepare_chatml_sample(chatml, self.tokenizer)
        if input_ids is None:
            raise EncodingError(
                f"sample {meta.get('id')!r} ({meta.get('source')}): boson could not encode it: "
                f"{chatter.getvalue().strip()[:500]}"
            )
        frames = [item["frames"] for item in meta["audio"]]
        codes = record["codes"]
        if len(audio_contents) != len(frames) or codes.shape[1] != sum(frames):
            raise EncodingError(
                f"sample {meta.get('id')!r}: {len(audio_contents)} audio items in the messages, "
                f"{len(frames)} in the shard record, codes hold {codes.shape[1]} frames"
            )
        starts = np.concatenate([[0], np.cumsum(frames)[:-1]]).astype(np.int64)
        n = len(frames)
        sample = ChatMLDatasetSample(
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            label_ids=torch.tensor(label_ids, dtype=torch.long),
            audio_ids_concat=torch.from_numpy(codes.astype(np.int64)),
            audio_ids_start=torch.from_numpy(starts),
            audio_waveforms_concat=torch.zeros(0),
            audio_waveforms_start=torch.zeros(n, dtype=torch.long),
            audio_sample_rate=torch.zeros(n),
            audio_speaker_indices=torch.full((n,), -1, dtype=torch.long),
        )
        sample.sample_id = meta.get("id")  # carried to the batch's sample_ids (counting, debugging)
        return sample
