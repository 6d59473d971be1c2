"""Evaluation during training: validation shard sets read like the training stream (every rank its own
equal share, the same order at every evaluation) give eval_loss and the per-codebook eval losses and
accuracies; optionally K validation prompts are generated with the family's generation loop, decoded with
the codec, written as WAV files and logged to TensorBoard as audio, and judged (eval.asr / eval.speaker /
eval.mos: eval_wer, eval_cer, eval_sim, eval_mos, eval_speaking_rate, eval_duration_ratio, computed as
`higgs-ds evaluate` computes them, higgs_ds.eval.scoring).

Under ZeRO-3 every rank holds a slice of each weight, so every rank runs the same generations in lockstep
(HF generate's synced_gpus); only rank 0 decodes, writes and judges (the judges are whole models of their
own), and its numbers go to every rank, so that each keeps the same best checkpoint.
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
    asr: str = ""
    """ASR judge (a local Whisper directory): eval_wer and eval_cer of the generated prompts."""
    speaker: str = ""
    """Speaker-verification judge (a local WavLM x-vector directory): eval_sim against each prompt's voice."""
    mos: str = ""
    """MOS judge (a local UTMOS-style directory, higgs_ds.eval.judges): eval_mos."""
    select: str = "loss"
    """The checkpoint to keep as best (HF's metric_for_best_model): loss (eval_loss), wer, cer, sim or mos;
    lower is better for loss/wer/cer, higher for sim/mos. The best is one saved at an evaluation step."""
    worse_warning: int = 3
    """Warn when a judged metric gets worse this many evaluations in a row while eval_loss improves (0: off)."""

    def judges(self) -> dict:
        return {k: v for k, v in (("asr", self.asr), ("speaker", self.speaker), ("mos", self.mos)) if v}

    def check(self) -> None:
        if self.generate and not self.shards:
            raise ConfigError("eval.generate needs validation shards: set eval.shards")
        if self.generate and not self.codec:
            raise ConfigError("eval.generate needs eval.codec: the codec the shards were built with ('tiny' or a path)")
        if self.shards and self.steps <= 0:
            raise ConfigError(f"eval.steps must be positive, got {self.steps}")
        if self.judges() and not self.generate:
            raise ConfigError("eval.asr / eval.speaker / eval.mos judge generated audio: set eval.generate (prompts)")
        needs = {"loss": None, "wer": "asr", "cer": "asr", "sim": "speaker", "mos": "mos"}
        if self.select not in needs:
            raise ConfigError(f"eval.select = {self.select!r}: use one of {', '.join(needs)}")
        judge = needs[self.select]
        if judge and not getattr(self, judge):
            raise ConfigError(f"eval.select = {self.select!r} needs the eval.{judge} judge (a local model directory)")
        if self.worse_warning < 0:
            raise ConfigError(f"eval.worse_warning must be >= 0, got {self.worse_warning}")


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
        self._judges: dict | None = None
        self.last_metrics: dict[str, float] = {}  # rank 0's eval_* numbers of the last run

    def run(self, model, tokenizer, step: int, writer=None, is_main: bool = True, device="cpu") -> list[Path]:
        from higgs_ds.eval.generate import decode, generate_codes

        written, waves = [], []
        for i, record in enumerate(self.records):
            codes = generate_codes(model, tokenizer, record, max_new_frames=self.cfg.max_new_frames, seed=i)
            if is_main:  # decoding is rank 0's alone: no collective inside the codec
                sample_id = record["json"].get("id", f"prompt{i}")
                waves.append(decode(self.codec, codes))
                written.append(self._write(waves[-1], step, sample_id, writer))
        if is_main and self.cfg.judges():
            self.last_metrics = self._judge(waves, tokenizer, device)
        return written

    def _judge(self, waves: list[np.ndarray], tokenizer, device) -> dict[str, float]:
        """The prompts' audio judged as `higgs-ds evaluate` judges it: {eval_wer: ..., ...} over the prompts."""
        from higgs_ds.eval.eval_set import recordings, shard_item
        from higgs_ds.eval.judges import load_judges
        from higgs_ds.eval.metrics import speech_seconds, summarize
        from higgs_ds.eval.scoring import score_waves

        if self._judges is None:  # loaded once, at the first evaluation, on rank 0 only
            from higgs_ds.shards.codec import outside_zero3  # ZeRO-3 would partition them: rank 0 holds them whole

            with outside_zero3():
                self._judges = load_judges(**self.cfg.judges(), device=str(device))
        items = [shard_item(r, tokenizer) for r in self.records]
        targets, refs = recordings(items, self.codec)
        rate = int(self.codec.provenance["sample_rate"])
        seconds = [None if t is None else speech_seconds(t, rate) or None for t in targets]
        scored = score_waves(waves, rate, [i.text for i in items], [i.language for i in items], self._judges,
                             speaker_refs=refs, target_seconds=seconds)  # fmt: skip
        summary = summarize([s.scores for s in scored])["all"]
        return {f"eval_{metric}": interval.value for metric, interval in summary.items() if interval.n}

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
