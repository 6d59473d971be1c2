"""Stage 7 of the data flow: ChatMLDatasetSamples -> one model batch, through boson's own
HiggsAudioSampleCollator with the released model's settings (delay pattern on, Whisper off, audio-in
as codes), read from the model config so a checkpoint trained otherwise is collated its own way.
"""

from __future__ import annotations

import dataclasses


def make_collator(model_config):
    from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator

    if model_config.encode_whisper_embed:
        raise ValueError(
            "this model config sets encode_whisper_embed=True (a Whisper audio tower); higgs-ds "
            "trains the released generation model, which reads audio as codes only"
        )
    return HiggsAudioSampleCollator(
        whisper_processor=None,
        audio_in_token_id=model_config.audio_in_token_idx,
        audio_out_token_id=model_config.audio_out_token_idx,
        pad_token_id=model_config.pad_token_id,
        audio_stream_bos_id=model_config.audio_stream_bos_id,
        audio_stream_eos_id=model_config.audio_stream_eos_id,
        round_to=8,
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


class BatchCollator:
    """Collate and turn the collator's dataclass into the dict a HF-style trainer passes to forward.

    `labels` is the unexpanded text labels, kept because HF/SWIFT trainers expect the key; the loss
    uses the model's expanded labels instead (see higgs_ds.loss). `sample_ids` names the samples."""

    def __init__(self, model_config):
        self.collator = make_collator(model_config)

    def __call__(self, samples: list) -> dict:
        if not samples:
            raise ValueError("empty micro-batch")
        collated = self.collator(samples)
        batch = {f.name: getattr(collated, f.name) for f in dataclasses.fields(collated)}  # no deep copy
        batch["labels"] = batch["label_ids"]
        batch["sample_ids"] = [getattr(s, "sample_id", None) for s in samples]
        return {k: v for k, v in batch.items() if v is not None}
