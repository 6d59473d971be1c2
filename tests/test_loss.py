"""The training loss is a token mean over the whole optimizer step: every micro-batch of the accumulation
window on every rank, whatever their sizes. Runs on this environment's family (both, under `make test`)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from higgs_ds.models.interface import config_family, logits_for_loss, make_collator
from higgs_ds.train.loss import LossConfig, higgs_loss, target_counts

from .envs import decoder_layers, load_tiny
from .test_collate import _samples


@pytest.mark.both_envs
def test_step_loss_is_the_token_mean_over_accumulation_and_ranks(tiny_model_dir):
    tok, config, model = load_tiny(tiny_model_dir)
    family = config_family(config)
    pool = _samples(tok, np.random.RandomState(5), 14)
    collate = make_collator(config, tok)
    # 2 ranks x 2 accumulation steps of very different sizes (1 to 5 samples)
    micro_batches = [collate(pool[a:b]) for a, b in [(0, 1), (1, 6), (6, 9), (9, 14)]]
    cfg = LossConfig(text_weight=0.7, codebook_weights=(4, 3, 2, 1, 1, 1, 1, 1))
    outs = [logits_for_loss(model, b, family) for b in micro_batches]

    # the reference: one CE per term over every target of the step, computed here from the formula
    text_ce = torch.cat(
        [
            F.cross_entropy(o.text_logits[:, :-1].flatten(0, 1), o.text_labels[:, 1:].flatten(), reduction="none")[
                o.text_labels[:, 1:].flatten() != -100
            ]
            for o in outs
        ]
    )
    w = torch.tensor(cfg.codebook_weights, dtype=torch.float32)
    w = w / w.sum()
    reference = cfg.text_weight * text_ce.mean()
    for k in range(8):
        ce_k = torch.cat(
            [
                F.cross_entropy(o.audio_logits[:-1, k], b["label_audio_ids"][k, 1:], reduction="none")[
                    b["label_audio_ids"][k, 1:] != -100
                ]
                for o, b in zip(outs, micro_batches)
            ]
        )
        reference = reference + w[k] * ce_k.mean()

    counts = sum(target_counts(b["label_ids"], b["label_audio_ids"], 8) for b in micro_batches)
    assert counts[0] == len(text_ce)
    scale = 2 * 2  # accumulation steps x ranks: what DeepSpeed's gas division and the rank average undo
    losses = [
        higgs_loss(o.text_logits, o.text_labels, o.audio_logits, b["label_audio_ids"], cfg, counts, scale)
        for o, b in zip(outs, micro_batches)
    ]
    step_loss = sum(loss for loss, _ in losses) / scale  # the gradient the optimizer sees is of this
    torch.testing.assert_close(step_loss, reference, rtol=1e-5, atol=1e-5)
    # the logged metrics, averaged over micro-batches and ranks as SWIFT's MeanMetric does, are the step's
    torch.testing.assert_close(sum(m["text_loss"] for _, m in losses) / scale, text_ce.mean().detach())

    grads = torch.autograd.grad(step_loss, decoder_layers(model)[0].audio_mlp.down_proj.weight, retain_graph=True)[0]
    ref_grads = torch.autograd.grad(reference, decoder_layers(model)[0].audio_mlp.down_proj.weight)[0]
    torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-7)

    # what a mean per micro-batch would have given instead: a different loss, so the test can tell
    per_batch = sum(
        higgs_loss(o.text_logits, o.text_labels, o.audio_logits, b["label_audio_ids"], cfg)[0]
        for o, b in zip(outs, micro_batches)
    ) / len(outs)
    assert abs(per_batch.item() - reference.item()) > 1e-3
