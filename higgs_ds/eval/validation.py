"""Evaluation during training: validation shard sets read like the training stream (every rank its own
equal share, the same order at every evaluation) give eval_loss and the per-codebook eval losses and
accuracies; optionally K validation prompts are generated with boson's generation loop, decoded with the
codec, written as WAV files and logged to TensorBoard as audio.

Under ZeRO-3 every rank holds a slice of each weight, so every rank runs the same generations in lockstep
(HF generate's synced_gpus); only rank 0 decodes and writes.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from higgs_ds.train.config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    shards: list[str] = field(default_factory=list)
    """Validation shard directories (built like the training shards); empty: no evaluation."""
    steps: int = 500
    """Evaluate every this many optimizer steps (and at the end of training)."""
    batch_size: int = 0
    """Samples per validation micro-batch on each rank; 0: the training data.batch_size."""
    generate: int = 0
    """Validation prompts (the first ones of the first shard set) to generate audio for at each evaluation."""
    max_new_frames: int = 250
    """Longest generated audio, in codec frames (25 per second)."""
    codec: str = ""
    """The codec that decodes generated codes ('tiny' or a codec directory); needed when generate > 0."""

    def check(self) -> None:
        if self.generate and not self.shards:
            raise ConfigError("eval.generate needs validation shards: set eval.shards")
        if self.generate and not self.codec:
            raise ConfigError("eval.generate needs eval.codec: the codec the shards were built with ('tiny' or a path)")
        if self.shards and self.steps <= 0:
            raise ConfigError(f"eval.steps must be positive, got {self.steps}")


def eval_data_config(cfg: EvalConfig, data):
    """The training DataConfig pointed at the validation shards (same budget, workers, collator); seed 0
    and epoch 0 at every evaluation, so each evaluation sees the same batches."""
    return dataclasses.replace(
        data,
        shards=list(cfg.shards),
        batch_size=cfg.batch_size or data.batch_size,
        seed=0,
        weights=None,  # the training mix and cloning are training's: validation reads its samples as they are
        clone_references=0.0,
    )


def prompt_records(shard_dirs: list[str], count: int) -> list[dict]:
    """The first `count` samples that end in a trained assistant audio turn, in index order."""
    from higgs_ds.eval.generate import has_audio
    from higgs_ds.stream.reader import load_index, read_shard

    records = []
    for d in shard_dirs:
        for shard in load_index(d)["shards"]:
            for _, record in read_shard(str(Path(d) / shard["file"])):
                last = record["json"]["messages"][-1]
                if last["role"] == "assistant" and has_audio(last["content"]):  # what generation continues
                    records.append(record)
                if len(records) == count:
                    return records
    return records


class AudioSamples:
    """Generates the evaluation prompts' audio; call `run` on every rank at every evaluation."""

    def __init__(self, cfg: EvalConfig, output_dir: str):
        from higgs_ds.shards.codec import resolve_codec

        self.cfg, self.output_dir = cfg, Path(output_dir)
        self.records = prompt_records(cfg.shards, cfg.generate)
        if len(self.records) < cfg.generate:  # said, not silently fewer
            log.warning(
                "eval.generate = %d, but the validation shards hold only %d samples ending in assistant audio: "
                "generating those",
                cfg.generate,
                len(self.records),
            )
        self.codec = resolve_codec(cfg.codec, device="cpu")

    def run(self, model, tokenizer, step: int, writer=None, is_main: bool = True) -> list[Path]:
        from higgs_ds.eval.generate import decode, generate_codes

        written = []
        for i, record in enumerate(self.records):
            codes = generate_codes(model, tokenizer, record, max_new_frames=self.cfg.max_new_frames, seed=i)
            if is_main:  # decoding is rank 0's alone: no collective inside the codec
                sample_id = record["json"].get("id", f"prompt{i}")
                written.append(self._write(decode(self.codec, codes), step, sample_id, writer))
        return written

    def _write(self, wave: np.ndarray, step: int, sample_id: str, writer) -> Path:
        import soundfile as sf

        rate = int(self.codec.provenance["sample_rate"])
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(sample_id)).lstrip(".") or "prompt"  # ids are data, not paths
        path = self.output_dir / "eval_audio" / f"step-{step}" / f"{safe}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, wave, rate)
        if writer is not None:
            peak = float(np.abs(wave).max()) if wave.size else 0.0
            writer.add_audio(f"eval_audio/{sample_id}", wave / max(peak, 1.0), step, sample_rate=rate)
        log.info("generated %s: %.2f s of audio at step %d -> %s", sample_id, len(wave) / rate, step, path)
        return path
