"""Stage 8 of the data flow: the training loss of Higgs-Audio v2 (the model's forward computes none).

* text: causal CE of `logits[:, :-1]` against the model's *expanded* labels `[:, 1:]` (the unexpanded
  label_ids do not line up with the logits once audio placeholders are expanded);
* audio: `audio_logits[j]` (one row per audio-out position, all segments of the batch in order)
  predicts the next column of `label_audio_ids`, per codebook. The collator makes the first column of
  every segment -100, so one global shift never crosses a segment boundary.

total = text_weight * text + sum_k w_k * CE_k with the codebook weights w normalised to sum 1; with
equal weights the audio term equals one CE over every (position, codebook) target, because every
codebook has the same number of targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass(frozen=True)
class LossConfig:
    text_weight: float = 1.0
    """Weight of the text CE in the total loss."""
    codebook_weights: tuple[float, ...] | None = None
    """Relative weight of each codebook's CE (default: equal)."""


def higgs_loss(logits, expanded_labels, audio_logits, label_audio_ids, cfg: LossConfig = LossConfig()):
    """Returns (total loss, metrics dict of floats-as-tensors: text_loss, audio_loss, audio_loss_cbK, audio_acc_cbK)."""
    text_targets = expanded_labels[:, 1:]
    text_logits = logits[:, :-1]
    live = text_targets != IGNORE
    if live.any():
        text = F.cross_entropy(text_logits[live].float(), text_targets[live])
    else:
        text = text_logits.sum() * 0.0  # keeps the graph (and ZeRO-3 hooks) identical on every rank

    num_codebooks = label_audio_ids.shape[0]
    targets = label_audio_ids[:, 1:].T  # (N-1, K): column j+1 is predicted from row j
    preds = audio_logits[:-1].float()  # (N-1, K, V)
    weights = torch.ones(num_codebooks) if cfg.codebook_weights is None else torch.tensor(cfg.codebook_weights)
    if len(weights) != num_codebooks:
        raise ValueError(f"codebook_weights has {len(weights)} entries, the model has {num_codebooks} codebooks")
    weights = (weights / weights.sum()).to(preds.device)

    metrics, audio = {}, preds.sum() * 0.0
    for k in range(num_codebooks):
        mask = targets[:, k] != IGNORE
        if mask.any():
            ce_k = F.cross_entropy(preds[mask, k], targets[mask, k])
            acc_k = (preds[mask, k].argmax(-1) == targets[mask, k]).float().mean()
        else:
            ce_k = preds[:, k].sum() * 0.0
            acc_k = torch.zeros((), device=preds.device)
        audio = audio + weights[k] * ce_k
        metrics[f"audio_loss_cb{k}"] = ce_k.detach()
        metrics[f"audio_acc_cb{k}"] = acc_k.detach()
    total = cfg.text_weight * text + audio
    metrics.update(text_loss=text.detach(), audio_loss=audio.detach())
    return total, metrics
