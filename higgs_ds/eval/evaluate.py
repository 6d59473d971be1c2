"""`higgs-ds evaluate`: model directories + an evaluation set + judges -> the table that says if a voice got better.

    higgs-ds evaluate FINETUNE_DIR [MORE_DIRS ...] --base BASE_DIR --set HELD_OUT_SHARDS --out eval/ \\
        --asr whisper-large-v3/ --speaker wavlm-base-plus-sv/ --mos utmos/

The set (higgs_ds.eval.eval_set): held-out shard directories, or external JSONL sets (SET.jsonl: the prompts
JSONL of `higgs-ds synthesize` plus language, speaker and target; a bad line is refused by name and the
others evaluated). Systems, each prompted the same way (the items' own prompts, one seed per item): every model
directory given (a fine-tune's export, or several: a run's exports in training order), the base model
(--base: the baseline a fine-tune must beat) and `reference`, the set's recordings themselves (the ceiling:
a shard set's through the codec, a JSONL set's files as they are). Each system's audio is judged by the
same judges (higgs_ds.eval.scoring). Written to
--out (atomically, nothing else touched):

    evaluation.json   per system: the summary (value, 95% bootstrap interval, n per metric; per language
                      when the set has several) and the settings
    evaluation.md     the same as a Markdown table, one row per system
    items.jsonl       one row per system and item: text, transcript, WER, CER, SIM, MOS, rates, the WAV's path
    SYSTEM/ID.wav     the audio that was judged (float32 WAV at the codec's rate)
    evaluation.png    each metric across the model directories in the order given (two or more)

Nothing is downloaded: judges are local directories (see README "Is my voice better?" for the checkpoints
that reproduce Seed-TTS-eval's protocol); a metric whose judge is not given is left out, not guessed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from higgs_ds.errors import UserError
from higgs_ds.eval import metrics as M
from higgs_ds.eval.eval_set import EvalItem, load_set, recordings, wav_name
from higgs_ds.eval.scoring import ScoredItem, score_waves
from higgs_ds.safe_io import atomic_write_bytes

REFERENCE = "reference"
TABLE_METRICS = ("wer", "cer", "sim", "mos", "speaking_rate", "duration_ratio")


@dataclass
class SystemResult:
    name: str
    kind: str  # model | base | reference
    path: str | None
    scored: list[ScoredItem] = field(default_factory=list)
    wavs: list[str | None] = field(default_factory=list)

    def summary(self) -> dict:
        return {group: {m: v.as_dict() for m, v in row.items()} for group, row in M.summarize(self.s()).items()}

    def s(self) -> list[M.ItemScores]:
        return [item.scores for item in self.scored]


def system_names(model_dirs: list[str], base: str | None) -> list[tuple[str, str, str]]:
    """(name, kind, path) per model system: the directory's name, made unique, `base` for --base."""
    out, seen = [], {REFERENCE, "base"}
    for path in model_dirs:
        name = Path(path).name or "model"
        while name in seen:
            name = f"{name}_"
        seen.add(name)
        out.append((name, "model", path))
    if base:
        out.append(("base", "base", base))
    return out


def evaluate(
    model_dirs: list[str],
    shard_dirs: list[str],
    out: str,
    *,
    base: str | None = None,
    judges: dict | None = None,
    codec_spec: str | None = None,
    sampling=None,
    device: str = "cpu",
    dtype: str = "auto",
    limit: int | None = None,
    seed: int = 0,
    max_reference_seconds: float = 30.0,
    say=print,
) -> dict:
    """Generate, judge and write the tables (see the module docstring); returns evaluation.json's content.
    `shard_dirs`: the --set sources, held-out shard directories or .jsonl sets; refused JSONL lines are in
    the report's set.refused (the caller decides the exit code)."""
    from higgs_ds.eval.synthesize import Sampling, check_device, checked_model_dir, find_codec, load_tokenizer

    if not model_dirs and not base:
        raise UserError("give at least one model directory (or --base) to evaluate")
    device = check_device(device)
    sampling = sampling or Sampling()
    sampling.check()
    systems = [(name, kind, *checked_model_dir(path)) for name, kind, path in system_names(model_dirs, base)]
    first = systems[0][2]
    codec, warning = find_codec(first, codec_spec, device)
    if warning:
        say(f"warning: {warning}")
    judges = judges or {}
    eval_set = _load_set(shard_dirs, load_tokenizer(first), codec, limit, max_reference_seconds, judges, say)
    items = eval_set.items
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rate = int(codec.provenance["sample_rate"])
    targets, refs = recordings(items, codec)
    results = [_judge_reference(items, targets, refs, rate, judges, out_dir)]
    for name, kind, path, family in systems:
        waves = _generate(path, family, items, codec, sampling, device, dtype, seed, name, say)
        result = SystemResult(name, kind, str(path))
        files = [out_dir / name / f"{wav_name(item.name)}.wav" for item in items]
        result.wavs = [_write_wav(f, w, rate) for f, w in zip(files, waves)]
        seconds = [None if t is None else M.speech_seconds(t, rate) for t in targets]
        result.scored = score_waves(waves, rate, [i.text for i in items], [i.language for i in items], judges,
                                    speaker_refs=refs, target_seconds=[s or None for s in seconds])  # fmt: skip
        results.append(result)
    report = _report(results, eval_set, sampling, seed, judges)
    _write_outputs(out_dir, results, items, report)
    say(markdown_table(report))
    return report


def _load_set(sources, tokenizer, codec, limit, max_reference_seconds, judges, say):
    """Every --set's items; each refused JSONL line said with its reason (the run goes on without it)."""
    eval_set = load_set(sources, tokenizer, codec, limit=limit, max_reference_seconds=max_reference_seconds)
    for r in eval_set.refused:
        say(f"{r.source}: refused: {r.reason}")
    say(f"evaluation set: {len(eval_set.items)} items, {len(eval_set.refused)} refused, from {', '.join(sources)}")
    if not eval_set.items:
        raise UserError(f"nothing to evaluate: {', '.join(sources)} gave no item "
                        f"({len(eval_set.refused)} lines refused, each named above)")  # fmt: skip
    _check_languages(eval_set.items, judges.get("asr"))
    return eval_set


def _check_languages(items: list[EvalItem], asr) -> None:
    """A language the multilingual ASR judge lacks fails before any model is loaded, not after generating."""
    config = getattr(getattr(asr, "model", None), "generation_config", None)
    if not getattr(config, "is_multilingual", False):
        return  # no ASR judge, or an English-only Whisper: it takes no language token
    missing: dict[str, list[str]] = {}
    for item in items:
        if item.language and M.base_language(item.language) not in asr.languages:
            missing.setdefault(M.base_language(item.language), []).append(item.name)
    if missing:
        named = "; ".join(f"{lang} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
                          for lang, names in sorted(missing.items()))  # fmt: skip
        raise UserError(f"ASR judge {asr.root} has no language {named}; it has {', '.join(asr.languages)}: "
                        "give a judge that knows them, or evaluate those items apart")  # fmt: skip


def item_seed(item: EvalItem, k: int, seed: int) -> int:
    """The set's own seed for the item (a JSONL line's), else --seed + k: every system gets the same one."""
    return item.seed if item.seed is not None else seed + k


def _judge_reference(items, targets, refs, rate, judges, out_dir) -> SystemResult:
    """The recordings as a system; SIM only where the item clones (against itself it would be 1 by definition)."""
    result = SystemResult(REFERENCE, REFERENCE, None)
    have = [i for i, t in enumerate(targets) if t is not None]
    cloned = [refs[i] if items[i].clones else None for i in have]
    result.scored = score_waves([targets[i] for i in have], rate, [items[i].text for i in have],
                                [items[i].language for i in have], judges, speaker_refs=cloned)  # fmt: skip
    for i, item in zip(have, result.scored):
        item.scores.duration_ratio = item.row["duration_ratio"] = 1.0
    result.wavs = [_write_wav(out_dir / REFERENCE / f"{wav_name(items[i].name)}.wav", targets[i], rate) for i in have]
    return result


def _generate(path, family, items, codec, sampling, device, dtype, seed, name, say) -> list[np.ndarray]:
    from tqdm import tqdm

    from higgs_ds.eval.generate import decode, generate_codes
    from higgs_ds.eval.synthesize import check_geometry, load_model, load_tokenizer, torch_dtype

    model = load_model(path, family, torch_dtype(dtype, device), device)
    check_geometry(model, codec)
    tokenizer = load_tokenizer(path)
    waves, kwargs = [], sampling.generate_kwargs()
    for k, item in enumerate(tqdm(items, desc=f"generating ({name})", unit="item", leave=False)):
        codes = generate_codes(
            model, tokenizer, item.record, seed=item_seed(item, k, seed), synced_gpus=False, **kwargs
        )
        waves.append(decode(codec, codes))
    del model
    return waves


def _write_wav(path: Path, wave: np.ndarray, rate: int) -> str:
    from higgs_ds.eval.synth_output import wav_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, wav_bytes(wave, rate))
    return str(path)


def _report(results, eval_set, sampling, seed, judges) -> dict:
    from dataclasses import asdict

    refused = [r.to_json() for r in eval_set.refused]
    items = len(eval_set.items)
    return {
        "set": {"sources": eval_set.sources, "items": items, "jsonl_lines": eval_set.jsonl_lines, "refused": refused},
        "judges": {k: str(getattr(j, "root", "")) for k, j in judges.items()},
        "sampling": asdict(sampling),
        "seed": seed,
        "systems": [{"name": r.name, "kind": r.kind, "path": r.path, "summary": r.summary()} for r in results],
    }


def _cell(stat: dict | None, metric: str) -> str:
    if not stat or stat["value"] is None or not math.isfinite(stat["value"]):
        return "-"
    pct = metric in ("wer", "cer")
    k = 100 if pct else 1
    text = f"{stat['value'] * k:.2f} [{stat['low'] * k:.2f}, {stat['high'] * k:.2f}]"
    return text + (" %" if pct else "")


def markdown_table(report: dict) -> str:
    head = "| system | " + " | ".join(TABLE_METRICS) + " | n |"
    lines = [head, "|" + "---|" * (len(TABLE_METRICS) + 2)]
    for system in report["systems"]:
        row = system["summary"].get("all", {})
        n = max((v["n"] for v in row.values()), default=0)
        cells = " | ".join(_cell(row.get(m), m) for m in TABLE_METRICS)
        lines.append(f"| {system['name']} ({system['kind']}) | {cells} | {n} |")
    return "\n".join(lines) + "\n\nvalue [95% bootstrap interval]; WER/CER in %, speaking rate in characters/s\n"


def _write_outputs(out_dir: Path, results, items, report) -> None:
    atomic_write_bytes(out_dir / "evaluation.json", (json.dumps(finite(report), indent=1) + "\n").encode())
    atomic_write_bytes(out_dir / "evaluation.md", markdown_table(report).encode())
    rows = []
    for r in results:
        judged = [(k, i) for k, i in enumerate(items) if r.kind != REFERENCE or i.recorded]
        for (k, item), scored, wav in zip(judged, r.scored, r.wavs):  # the reference: the recorded items only
            seed = None if r.kind == REFERENCE else item_seed(item, k, report["seed"])
            row = {"system": r.name, "id": item.name, "speaker": item.speaker, **scored.row, "seed": seed, "wav": wav}
            rows.append(json.dumps(finite(row)))
    atomic_write_bytes(out_dir / "items.jsonl", ("\n".join(rows) + "\n").encode())
    models = [r for r in results if r.kind == "model"]
    if len(models) >= 2:
        _plot(out_dir / "evaluation.png", models)


def finite(obj):
    """JSON has no inf/NaN: a rate of an item without speech (inf) or a statistic over none (NaN) -> null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def _plot(path: Path, models: list[SystemResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = [m.summary().get("all", {}) for m in models]
    shown = [m for m in TABLE_METRICS if any(m in s for s in summaries)]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3), squeeze=False)
    x = np.arange(len(models))
    for ax, metric in zip(axes[0], shown):
        stats = [s.get(metric) for s in summaries]
        value = [st["value"] if st else np.nan for st in stats]
        low = [st["value"] - st["low"] if st else 0 for st in stats]
        high = [st["high"] - st["value"] if st else 0 for st in stats]
        ax.errorbar(x, value, yerr=[low, high], marker="o", capsize=3)
        ax.set_xticks(x, [m.name for m in models], rotation=45, ha="right", fontsize=7)
        ax.set_title(metric)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
