"""The shard stream's and the loss's settings that SWIFT has no flag for, read from the environment on the
`swift sft` path (`higgs-ds train` takes them from its config instead). No ms-swift import."""

from __future__ import annotations

import os

from higgs_ds.errors import UserError

ENV_MAX_TOKENS = "HIGGS_DS_MAX_TOKENS"  # data.max_tokens: budget batching instead of a fixed batch size
ENV_MAX_LENGTH = "HIGGS_DS_MAX_LENGTH"  # data.max_length (SWIFT's --max_length defaults to the model's context)
ENV_PEAK_TFLOPS = "HIGGS_DS_PEAK_TFLOPS"  # peak_tflops, for the mfu metric
ENV_LOG_SAMPLE_IDS = "HIGGS_DS_LOG_SAMPLE_IDS"  # "1": log_sample_ids (output_dir/samples_rank{R}.jsonl)
ENV_TEXT_WEIGHT = "HIGGS_DS_TEXT_WEIGHT"  # loss.text_weight
ENV_CODEBOOK_WEIGHTS = "HIGGS_DS_CODEBOOK_WEIGHTS"  # loss.codebook_weights, comma-separated: "2,1,1,1,1,1,1,1"
ENV_LOADER_TIMEOUT = "HIGGS_DS_LOADER_TIMEOUT"  # data.loader_timeout: seconds a rank waits for a worker's batch


def env_number(name: str, kind=int):
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"${name} must be a number, got {value!r}") from None
