"""The `higgs-ds evaluate` command line (higgs_ds.cli registers it); the work is higgs_ds.eval.evaluate."""

from __future__ import annotations

import argparse
import math

from higgs_ds.errors import UserError

EVALUATE_HELP = """\
Is my voice better? Model directories (a fine-tune's export, or several exports in training order) and the
base model (--base) generate the evaluation set's prompts with the same seeds; the judges listen to every
system and to the set's recordings themselves (the `reference` row: the ceiling; a shard set's through the
codec). The set (--set): held-out shard directories (`shards build --split`) or external JSONL sets (below).

  WER / CER       ASR transcript (--asr: a Whisper directory) against the text, Whisper-normalised; the
                  corpus rate (sum of edits / sum of reference words); per language where items say
  SIM             cosine of speaker embeddings (--speaker: WavLM x-vector) between the audio and the voice
                  in the prompt (cloning items) or the speaker's recording of the text
  MOS             a UTMOS-style predictor (--mos)
  speaking rate   normalised characters per second of speech; duration ratio against the recording

Each with a 95% bootstrap interval over the items. A judge not given leaves its metric out. Written to
--out: evaluation.json, evaluation.md (the table), items.jsonl (a row per system and item, with the WAV
path: listen to the worst), SYSTEM/ID.wav, and evaluation.png (each metric across the model directories).
Nothing is downloaded; numbers from tiny random-weight judges (tests, the demo) say nothing of quality."""


# the format higgs_ds.eval.eval_set.jsonl_items reads (kept here: the parser is built without torch)
JSONL_SET_HELP = """\
An external evaluation set (--set SET.jsonl): the prompts JSONL of `higgs-ds synthesize --batch` (one JSON
object per line, UTF-8; blank lines ignored), plus three fields of its own:

  text        (required) what to say; the words WER is counted against
  id          the item's name: SYSTEM/ID.wav in --out (letters, digits, '.', '_', '-'; default line-N)
  reference   {"audio": PATH, "text": TRANSCRIPT}: the voice to clone; SIM is judged against this audio
  references  [{"audio": ..., "text": ...}, ...]: a dialogue's speakers (SIM against the first)
  scene, system
              as in synthesize: boson's scene block, the system text
  seed        this item's seed (default --seed + k for item k)
  language    e.g. "en", "zh": WER/CER normalised for it (zh, ja, ... by character), a row per language
  speaker     who speaks it (kept in items.jsonl)
  target      {"audio": PATH}: the recording of this text: the `reference` row and the duration ratio
              (and SIM when nothing is cloned); without it the item has neither

Paths are relative to the JSONL file's folder. The references are encoded by the codec into the prompt; the
judges hear the reference and target files as they are (resampled, as Seed-TTS-eval judges them; both at
most --max-reference-seconds). Any other field, a missing or empty text, a reference or target file that
cannot be decoded, a bad language, or a repeated id refuses that line, named (FILE line N) with its reason;
the others are evaluated, the refusals listed in evaluation.json, and the command exits 2 when any was
refused (items + refused = lines). A Seed-TTS-eval list (`utt|prompt_text|prompt_wav|text`) maps to {"id":
utt, "text": text, "reference": {"audio": prompt_wav, "text": prompt_text}} (README)."""


def add_evaluate(sub, exit_codes_help: str) -> None:
    s = sub.add_parser(
        "evaluate",
        help="model dirs (+ --base) on held-out shards or a JSONL set -> WER, SIM, MOS, speaking rate with intervals",
        description=EVALUATE_HELP,
        epilog=f"{JSONL_SET_HELP}\n\n{exit_codes_help}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("model_dirs", nargs="*", help="model directories to evaluate, in order (exports, converted)")
    s.add_argument("--base", default=None, help="the base model: the baseline a fine-tune must beat")
    s.add_argument(
        "--run",
        default=None,
        help="a training output dir: each complete checkpoint-N is exported to OUT/exports/checkpoint-N "
        "(higgs-ds export) and evaluated, oldest first, after the model dirs",
    )
    s.add_argument("--set", required=True, action="append", dest="shards", metavar="SET",
                   help="a held-out shard directory (index.json) or a SET.jsonl (below); repeat it")  # fmt: skip
    s.add_argument("--out", required=True, help="the folder to write the tables and audio into")
    s.add_argument("--asr", default=None, help="ASR judge: a local Whisper model directory")
    s.add_argument("--speaker", default=None, help="speaker-verification judge: a local WavLM x-vector directory")
    s.add_argument("--mos", default=None, help="MOS judge: a local UTMOS-style directory (higgs-ds format)")
    s.add_argument("--limit", type=int, default=None, help="the first N items of the set only")
    s.add_argument("--codec", default=None, help="the codec the shards were built with (a directory or 'tiny')")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda (cuda:N)")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    s.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (0.7)")
    s.add_argument("--top-k", type=int, default=0, help="0: off (0)")
    s.add_argument("--top-p", type=float, default=0.95, help="1: off (0.95)")
    s.add_argument("--ras-win-len", type=int, default=7, help="repetition-aware sampling window; 0: off (7)")
    s.add_argument("--ras-max-repeat", type=int, default=2, help="repeats allowed in that window (2)")
    s.add_argument(
        "--seed", type=int, default=0, help="item k is generated with seed + k, unless its JSONL line has a seed (0)"
    )
    s.add_argument("--max-seconds", type=float, default=30.0, help="longest audio to generate per item (30)")
    s.add_argument("--max-frames", type=int, default=None, help="the same in codec frames (25 a second)")
    s.add_argument("--max-reference-seconds", type=float, default=30.0,
                   help="longest reference or target recording of a JSONL set (30)")  # fmt: skip
    s.set_defaults(func=run_cli)


def run_cli(args) -> int:
    from higgs_ds.eval.evaluate import evaluate
    from higgs_ds.eval.judges import load_judges
    from higgs_ds.eval.synthesize import _sampling

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if not (math.isfinite(args.max_reference_seconds) and args.max_reference_seconds > 0):
        raise UserError(f"--max-reference-seconds must be a positive number, got {args.max_reference_seconds}")
    model_dirs = list(args.model_dirs) + (run_exports(args.run, args.out) if args.run else [])
    judges = load_judges(args.asr, args.speaker, args.mos, device=args.device)
    if not judges:
        print("higgs-ds evaluate: no judge given (--asr, --speaker, --mos): only the audio measures are computed")
    report = evaluate(
        model_dirs,
        args.shards,
        args.out,
        base=args.base,
        judges=judges,
        codec_spec=args.codec,
        sampling=_sampling(args),
        device=args.device,
        dtype=args.dtype,
        limit=args.limit,
        seed=args.seed,
        max_reference_seconds=args.max_reference_seconds,
    )
    refused, lines = report["set"]["refused"], report["set"]["jsonl_lines"]
    if refused:  # the others were evaluated and written; the exit code says not all of the set was
        raise UserError(f"{len(refused)} of {lines} JSONL lines refused (each named above and in evaluation.json)")
    return 0


def run_exports(run_dir: str, out: str) -> list[str]:
    """Every complete checkpoint of a run exported (ZeRO-3 consolidated, as `higgs-ds export` does) into
    OUT/exports/checkpoint-N, oldest first: a checkpoint itself is not a model directory (it carries
    DeepSpeed's scripts, and ZeRO-3 keeps its weights in partitions)."""
    from pathlib import Path

    from higgs_ds.tools.export import export
    from higgs_ds.train.checkpoint import checkpoints, is_complete

    complete = [c for c in checkpoints(run_dir) if is_complete(c)]
    if not complete:
        raise UserError(f"--run {run_dir} holds no complete checkpoint-N: pass a training output_dir")
    exported = []
    for ckpt in complete:
        print(f"higgs-ds evaluate: exporting {ckpt}", flush=True)
        exported.append(str(export(str(ckpt), str(Path(out) / "exports" / ckpt.name))))
    return exported
