"""The `higgs_audio` template: boson's batch layout and the loss SWIFT trains on.

Batches are boson's HiggsAudioSampleCollator's (higgs_ds.stream.collate, vectorised and checked against it,
through higgs_ds.models.interface for either family), and the loss is computed here (higgs_ds.train.loss)
because the model's forward computes none. Registered with ms-swift by higgs_ds.train.swift.register.
"""

from __future__ import annotations

from swift.template import Template
from transformers.modeling_outputs import CausalLMOutput

from higgs_ds.models.interface import config_family, geometry, logits_for_loss, make_collator
from higgs_ds.train.loss import LossConfig, higgs_loss, target_counts


class HiggsAudioTemplate(Template):
    support_padding_free = False
    use_model = False
    model_accepts_loss_kwargs = False  # HF divides by accumulation steps; the loss scales for it (higgs_ds.train.loss)
    loss_config = LossConfig()
    collator_mode = "fast"  # DataConfig.collator

    def _collator(self):
        if getattr(self, "_batch_collator", None) is None:
            self._batch_collator = make_collator(self.config, self.tokenizer, self.collator_mode)
        return self._batch_collator

    def data_collator(self, batch, *, padding_to=None):
        return self._collator()(batch)

    def compute_sft_loss(self, model, inputs, num_items_in_batch=None, trainer=None):
        out = logits_for_loss(model, inputs, config_family(self.config))
        counts, scale = None, 1.0
        if trainer is not None and model.training and getattr(trainer, "step_target_counts", None) is not None:
            # token-mean over the whole optimizer step (see higgs_ds.train.loss); check the up-front text count
            counts = trainer.step_target_counts
            scale = trainer.args.gradient_accumulation_steps * trainer.args.world_size
            num_codebooks = geometry(self.config).num_codebooks
            expected = target_counts(inputs["label_ids"], inputs["label_audio_ids"], num_codebooks)
            actual = int((out.text_labels[:, 1:] != -100).sum())
            if actual != int(expected[0]):
                raise RuntimeError(
                    f"text targets: {actual} in the expanded labels, {int(expected[0])} counted up front"
                )
        loss, metrics = higgs_loss(
            out.text_logits,
            out.text_labels,
            out.audio_logits,
            inputs["label_audio_ids"],
            self.loss_config,
            global_counts=counts,
            scale=scale,
        )
        if trainer is not None:
            mode = "train" if model.training else "eval"
            for name, value in metrics.items():
                trainer.custom_metrics[mode][name].update(value)
            counts = getattr(trainer, "throughput_counts", None)
            if counts is not None and model.training:
                labels = inputs["label_audio_ids"][0]
                eos = geometry(self.config).stream_eos  # v2's stream EOS, v3's EOC: not a frame
                frames = ((labels != -100) & (labels != eos)).sum().item()
                counts["tokens"] += out.attended
                counts["audio_seconds"] += frames / 25.0  # the codec's frame rate (checked against the shards)
                counts["sequences"] += int(inputs["input_ids"].shape[0])
        # Only the loss goes back (logits None): SWIFT's token accuracy would compare expanded logits with
        # unexpanded labels. A ModelOutput, because SWIFT reads it both as a dict and by attribute.
        return CausalLMOutput(loss=loss, logits=None)
