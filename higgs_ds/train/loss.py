"""Stage 8 of the data flow: the training loss of Higgs-Audio v2 (the model's forward computes none).

* text: causal CE of `logits[:, :-1]` against the model's *expanded* labels `[:, 1:]` (the unexpanded
  label_ids do not line up with the logits once audio placeholders are expanded);
* audio: `audio_logits[j]` (one row per audio-out position, all segments of the batch in order)
  predicts the next column of `label_audio_ids`, per codebook. The collator makes the first column of
  every segment -100, so one global shift never crosses a segment boundary.

total = text_weight * text + sum_k w_k * CE_k with the codebook weights w normalised to sum 1.

Each CE is a mean over target tokens. In training the mean is over every target of the optimizer step:
all micro-batches of the gradient-accumulation window on all ranks (`TargetCounts`), so a micro-batch
with few targets weighs as little as its targets, not as much as a full one. The trainer backpropagates
`scale * sum / global count` with scale = accumulation steps x ranks, because DeepSpeed / accelerate
divide by the accumulation steps and data parallelism averages over ranks.
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


def target_counts(label_ids: torch.Tensor, label_audio_ids: torch.Tensor, num_codebooks: int) -> torch.Tensor:
    """[text targets, codebook 0 targets, ..., codebook K-1 targets] of one collated batch, from the batch
    alone (before any forward): the text targets of the expanded labels are exactly the unexpanded label
    ids' (placeholders expand to -100 positions), which compute_sft_loss checks on every micro-batch."""
    counts = torch.zeros(1 + num_codebooks, dtype=torch.float64)
    counts[0] = (label_ids[:, 1:] != IGNORE).sum()
    if label_audio_ids.numel():
        counts[1:] = (label_audio_ids[:, 1:] != IGNORE).sum(dim=1)
    return counts


def higgs_loss(
    logits,
    expanded_labels,
    audio_logits,
    label_audio_ids,
    cfg: LossConfig = LossConfig(),
    global_counts: torch.Tensor | None = None,
    scale: float = 1.0,
):
    """Returns (total loss, metrics dict of floats-as-tensors: text_loss, audio_loss, audio_loss_cbK, audio_acc_cbK).

    Without `global_counts` every CE is this batch's token mean. With them (target_counts summed over the
    optimizer step's micro-batches and ranks), every term is `scale * sum over this batch / global count`,
    and so are the metrics: averaged over the step's micro-batches and ranks they are the step's means."""
    text_targets = expanded_labels[:, 1:]
    text_logits = logits[:, :-1]
    live = text_targets != IGNORE
    text_sum = F.cross_entropy(text_logits[live].float(), text_targets[live], reduction="sum")
    if global_counts is None:
        text_norm = live.sum().clamp(min=1)
    else:
        text_norm = global_counts[0].clamp(min=1).item() / scale
    text = text_sum / text_norm if live.any() else text_logits.sum() * 0.0  # same graph on every rank (ZeRO-3)

    num_codebooks = label_audio_ids.shape[0] if label_audio_ids.numel() else audio_logits.shape[1]
    targets = label_audio_ids[:, 1:].T  # (N-1, K): column j+1 is predicted from row j
    preds = audio_logits[:-1].float()  # (N-1, K, V)
    weights = torch.ones(num_codebooks) if cfg.codebook_weights is None else torch.tensor(cfg.codebook_weights)
    if len(weights) != num_codebooks:
        raise ValueError(f"codebook_weights has {len(weights)} entries, the model has {num_codebooks} codebooks")
    weights = (weights / weights.sum()).to(preds.device)

    metrics, audio = {}, preds.sum() * 0.0
    for k in range(num_codebooks):
        mask = targets[:, k] != IGNORE if targets.numel() else torch.zeros(0, dtype=torch.bool)
        norm = mask.sum().clamp(min=1) if global_counts is None else global_counts[1 + k].clamp(min=1).item() / scale
        if mask.any():
            ce_k = F.cross_entropy(preds[mask, k], targets[mask, k], reduction="sum") / norm
            acc_k = (preds[mask, k].argmax(-1) == targets[mask, k]).sum() / norm
        else:
            ce_k = preds[:, k].sum() * 0.0
            acc_k = torch.zeros((), device=preds.device)
        audio = audio + weights[k] * ce_k
        metrics[f"audio_loss_cb{k}"] = ce_k.detach()
        metrics[f"audio_acc_cb{k}"] = acc_k.detach().float()
    total = cfg.text_weight * text + audio
    metrics.update(text_loss=text.detach(), audio_loss=audio.detach())
    return total, metrics
