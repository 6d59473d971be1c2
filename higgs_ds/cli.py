"""The `higgs-ds` command: a thin shell over the library functions (which the tests call directly)."""

from __future__ import annotations

import argparse
import json
import sys

from higgs_ds.errors import EXIT_CODES_HELP, CheckFailed, UserError, report
from higgs_ds.models.family import ALL_FAMILIES


def _tiny_model(args):
    from higgs_ds.models.tiny import write_tiny

    print(f"wrote {write_tiny(args.out_dir, family=args.family, seed=args.seed)}")


def _tiny_codec(args):
    from higgs_ds.shards.codec import write_tiny_codec

    print(f"wrote {write_tiny_codec(args.out_dir, seed=args.seed)}")


def _parse_size(text: str) -> tuple[int | None, int | None]:
    """'1000' -> (1000 samples, None); '256MB' / '1GB' -> (None, bytes)."""
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    try:
        for unit, factor in units.items():
            if text.upper().endswith(unit):
                return None, int(float(text[: -len(unit)]) * factor)
        return int(text), None
    except ValueError:
        raise UserError(f"--shard-size must be a sample count (1000) or a size (256MB), got {text!r}") from None


def _check_tokenizer_dir(directory: str) -> None:
    """A model directory (config.json) is checked as every model is; a bare tokenizer directory (a
    save_pretrained tokenizer) holds only regular files, and remote code is impossible in this process."""
    import stat
    from pathlib import Path

    from higgs_ds.models.trust import check_model_dir, forbid_remote_code

    forbid_remote_code()
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"--tokenizer {directory} is not a directory: name a model or tokenizer directory")
    if (root / "config.json").exists():
        check_model_dir(root)
        return
    for path in root.iterdir():  # a FIFO named tokenizer.json would never finish reading
        if not (stat.S_ISREG(path.lstat().st_mode) or path.is_dir()):
            raise UserError(f"--tokenizer {directory}: {path} is not a regular file: remove it")


def _shards_build(args):
    from higgs_ds.shards.build import BuildConfig, build_shards

    for directory in args.tokenizer or ():  # model or tokenizer directories: data, never code
        _check_tokenizer_dir(directory)

    samples, size = _parse_size(args.shard_size)
    try:
        index, count = (int(x) for x in args.slice.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise UserError(f"--slice must be I/N with 0 <= I < N, got {args.slice!r}") from None
    cfg = BuildConfig(
        max_seconds=args.max_seconds,
        max_sample_seconds=args.max_sample_seconds,
        shard_samples=samples or 10**9,
        shard_bytes=size or 256 << 20,
        min_shards=args.min_shards,
        workers=args.workers,
        fast_fail=args.fast_fail,
        slice_index=index,
        num_slices=count,
        resume=args.resume,
        tokenizer=tuple(args.tokenizer) if args.tokenizer else None,
        codec_batch=args.codec_batch,
    )
    parts = [(args.out, cfg)]
    if (args.split is None) != (args.heldout_out is None):
        raise UserError("--split and --heldout-out go together: the held-out part is written to --heldout-out")
    if args.split is not None:
        from dataclasses import replace

        from higgs_ds.shards.split import HELDOUT, parse_split

        parse_split(args.split)  # a bad spec is refused before anything is built
        cfg = replace(cfg, split=args.split)
        parts = [(args.out, cfg), (args.heldout_out, replace(cfg, split_part=HELDOUT))]
    for out, part_cfg in parts:
        summary = build_shards(args.manifests, out, args.codec, part_cfg, device=args.device)
        print(json.dumps(summary, indent=1))
        if "warning" in summary:  # the build succeeded: a warning is said, not an exit code
            print(f"higgs-ds: warning: {summary['warning']}", file=sys.stderr)
    return 0


def _shards_index(args):
    from higgs_ds.shards.build import merge_slices

    print(json.dumps(merge_slices(args.dir), indent=1))


def _shards_verify(args):
    from higgs_ds.shards.verify import verify_shards

    result = verify_shards(args.dir)
    print(json.dumps(result, indent=1))
    for path, why in result["bad_shards"].items():
        print(f"bad shard {path}: {why}", file=sys.stderr)
    return 1 if result["bad_shards"] else 0


def _shards_stats(args):
    from higgs_ds.shards.verify import shard_stats

    print(json.dumps(shard_stats(args.dir, plot=args.plot), indent=1))


def _train(args):
    from higgs_ds.train.run import main as train_main

    return train_main(args.rest)


def _export(args):
    from higgs_ds.tools.export import export

    out = export(
        args.checkpoint,
        args.out,
        dtype=args.dtype,
        merge_lora=args.merge_lora,
        base=args.base,
        fmt=args.format,
        codec=args.codec,
    )
    written = json.loads((out / "higgs_ds_export.json").read_text())
    print(f"exported {out} ({written.get('model_format')} format)")


def _convert(args):
    from higgs_ds.models.convert import convert_model

    print(f"converted {args.dir} -> {convert_model(args.dir, args.to, args.out)} ({args.to} format)")


def _check_export(args):
    from higgs_ds.tools.export import check_export

    result = check_export(args.model_dir, args.probe, atol=args.atol, rtol=args.rtol)
    print(json.dumps(result))
    return 0 if result["equal"] else 1


def _preflight(args):
    from higgs_ds.models.trust import forbid_remote_code
    from higgs_ds.tools.preflight import run

    forbid_remote_code()  # preflight reads the model's config (resolve_config checks the directory first)

    # argparse.REMAINDER takes everything after CONFIG; take preflight's own options back out of it
    own = argparse.ArgumentParser(prog="higgs-ds preflight", add_help=False)
    own.add_argument("--nodes", type=int, default=args.nodes)
    own.add_argument("--gpus-per-node", type=int, default=args.gpus_per_node)
    own.add_argument("--gpu-memory-gb", type=float, default=args.gpu_memory_gb)
    own.add_argument("--hashes", action="store_true", default=args.hashes)
    opts, overrides = own.parse_known_args(args.overrides)
    return run(args.config, overrides, opts.nodes, opts.gpus_per_node, opts.gpu_memory_gb, opts.hashes)


def _synthesize(args):
    from higgs_ds.eval.synthesize import run_cli

    return run_cli(args)


def _demo(args):
    from higgs_ds.tools.demo import run_demo

    return run_demo(args.workdir, steps=args.steps, family=args.family)


CONVERT_HELP = """\
Convert a Higgs-Audio v2 model directory between its two formats; the weights are copied bit for bit.

  native  transformers' HiggsAudioV2ForConditionalGeneration (config model_type higgs_audio_v2,
          transformers >= 5.3): the `main` branch of bosonai/higgs-audio-v2-generation-3B-base since
          April 2026. The default environment (.venv) trains it. Written with the processor, chat template
          and generation config of that layout.
  boson   boson_multimodal's HiggsAudioModel (model_type higgs_audio, transformers 4.46): revision
          10840182ca4ad5d9d9113b60b9bb3c1ef1ba3f84 of that repository, community fine-tunes made with
          boson's code, `higgs-ds export --format boson`. The boson environment (.venv-boson) trains it.

Fine-tunes and merged LoRA exports convert like the release (LoRA adapters: merge them first with
`higgs-ds export --merge-lora`). A codec directory converts too (boson's config.json + model.pth,
revision 9d4988fb of bosonai/higgs-audio-v2-tokenizer <-> native HiggsAudioV2TokenizerModel, its `main`).

Refused, naming the key or setting, with nothing written: a missing, unexpected or mis-shaped weight; a
boson architecture the native class cannot compute (a layer without the audio FFN, the stack adapter,
audio_decoder_proj_num_layers > 0, an audio-out embedding projector or self-attention, Whisper features
or an audio tower, averaged audio embeddings, no delay pattern, the RQ-transformer); a rope other than
default/llama3; audio token ids that disagree with the tokenizer; an --out that exists and is not empty.
boson's partially frozen embedding/head halves are joined. The directory is built beside --out and
renamed into place."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="higgs-ds", description="Fine-tune Higgs-Audio v2: shards, training, export.", epilog=EXIT_CODES_HELP
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("tiny-model", help="write a tiny random-weight Higgs-Audio model + tokenizer (offline)")
    s.add_argument("out_dir")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--family",
        choices=ALL_FAMILIES,
        default=None,
        help="native: HiggsAudioV2ForConditionalGeneration; boson: boson_multimodal's HiggsAudioModel; v3: Higgs "
        "TTS 3 in its released layout (default environment) (default: the v2 family this environment trains)",
    )
    s.set_defaults(func=_tiny_model)

    s = sub.add_parser(
        "tiny-codec", help="write a tiny random-weight Higgs audio codec directory in this environment's format"
    )
    s.add_argument("out_dir")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_tiny_codec)

    shards = sub.add_parser("shards", help="build WebDataset shards of codec codes").add_subparsers(
        dest="shards_command", required=True, metavar="SUBCOMMAND"
    )
    s = shards.add_parser(
        "build",
        help="manifest(s) -> audio -> codec codes -> tar shards + index.json",
        description="Decode, resample to 24 kHz and encode every audio item once; write shards, index.json and "
        "rejects.jsonl (every input line not written, with its reason).",
    )
    s.add_argument("manifests", nargs="+", help="ChatML or plain-TTS JSONL manifests (audio paths relative to each)")
    s.add_argument("--out", required=True, help="output shard directory")
    s.add_argument(
        "--codec",
        required=True,
        help="codec directory of this environment's family (native: config.json + model.safetensors, Boson's "
        "main; boson: config.json + model.pth, revision 9d4988fb), or 'tiny'",
    )
    s.add_argument("--max-seconds", type=float, default=30.0, help="reject audio items longer than this (30)")
    s.add_argument(
        "--max-sample-seconds",
        type=float,
        default=120.0,
        help="reject samples holding more audio than this, references included (120)",
    )
    s.add_argument("--shard-size", default="1000", help="samples per shard (1000), or a size such as 256MB")
    s.add_argument(
        "--min-shards",
        type=int,
        default=1,
        help="at least this many shards: the largest ranks x dataloader workers you will train on",
    )
    s.add_argument("--workers", type=int, default=1, help="encoding processes (1)")
    s.add_argument(
        "--slice",
        default="0/1",
        help="I/N: build the I-th of N parts of the input (job arrays); merge: `higgs-ds shards index DIR`",
    )
    s.add_argument("--resume", action="store_true", help="continue an interrupted build after its last complete shard")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument(
        "--fault-tolerant",
        dest="fast_fail",
        action="store_false",
        help="record bad samples in rejects.jsonl and go on (default)",
    )
    mode.add_argument("--fast-fail", dest="fast_fail", action="store_true", help="stop at the first bad sample")
    s.add_argument(
        "--tokenizer",
        action="append",
        default=None,
        help="model (or tokenizer) directory: store exact expanded lengths per sample; give it twice for a "
        "Higgs-Audio v2 and a Higgs TTS 3 model (one shard set, exact lengths for both families)",
    )
    s.add_argument("--device", default="cpu", help="codec device: cpu or cuda")
    s.add_argument(
        "--codec-batch",
        type=int,
        default=0,
        help="equal-length clips per codec call (default: 16 on cuda, 1 on cpu, where batching does not pay)",
    )
    s.add_argument(
        "--split",
        default=None,
        help="hold out samples for evaluation: a FRACTION (0.05: by a hash of the sample id) or speakers=A,B "
        "(whole speakers); deterministic, independent of order and slicing; needs --heldout-out",
    )
    s.add_argument("--heldout-out", default=None, help="with --split: the held-out part's shard directory")
    s.set_defaults(func=_shards_build, fast_fail=False)

    s = shards.add_parser("index", help="merge the slice indexes of a --slice build into index.json")
    s.add_argument("dir")
    s.set_defaults(func=_shards_index)

    s = shards.add_parser("verify", help="re-hash and decode every shard; exit 1 naming each bad shard")
    s.add_argument("dir")
    s.set_defaults(func=_shards_verify)

    s = shards.add_parser("stats", help="hours, samples, speakers, duration and expanded-length histograms")
    s.add_argument("dir")
    s.add_argument("--plot", default=None, help="write the histograms to this PNG")
    s.set_defaults(func=_shards_stats)

    s = sub.add_parser("train", help="train through ms-swift + DeepSpeed (run under torchrun)", add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=_train)

    s = sub.add_parser("export", help="checkpoint -> Hugging Face model directory (ZeRO-3 consolidated on CPU)")
    s.add_argument("checkpoint", help="checkpoint-N directory, or an output dir (its newest complete checkpoint)")
    s.add_argument("--out", required=True)
    s.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights dtype (float32)")
    s.add_argument("--merge-lora", action="store_true", help="merge a LoRA checkpoint's adapters into its base model")
    s.add_argument("--base", default=None, help="LoRA base model directory (default: the one recorded in the adapter)")
    s.add_argument(
        "--format",
        choices=ALL_FAMILIES,
        default="native",
        help="native (default): transformers-native HiggsAudioV2ForConditionalGeneration, as Boson publishes it "
        "since April 2026; boson: boson_multimodal's HiggsAudioModel, for boson's serve engine; v3: a Higgs TTS 3 "
        "checkpoint's released layout with its licence files (implied for a Higgs TTS 3 checkpoint)",
    )
    s.add_argument(
        "--codec",
        default=None,
        help="native format: the audio tokenizer the export's processor_config.json names (a local codec directory, "
        "written as its absolute path, or a hub id; default bosonai/higgs-audio-v2-tokenizer)",
    )
    s.set_defaults(func=_export)

    s = sub.add_parser(
        "convert",
        help="convert a model (or codec) directory between the native and boson formats, exactly",
        description=CONVERT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXIT_CODES_HELP,
    )
    s.add_argument("dir", help="the model or codec directory to convert (left as it is)")
    s.add_argument("--to", required=True, choices=["native", "boson"], help="the format to write")
    s.add_argument("--out", required=True, help="a new (or empty) folder for the converted directory")
    s.set_defaults(func=_convert)

    s = sub.add_parser("check-export", help="reload an export and compare its logits with the trained model's")
    s.add_argument("model_dir")
    s.add_argument("--probe", required=True, help="probe.pt written by training with save_probe = true")
    s.add_argument("--atol", type=float, default=1e-5)
    s.add_argument("--rtol", type=float, default=1e-4)
    s.set_defaults(func=_check_export)

    s = sub.add_parser("preflight", help="check shards, codec, plan, disk and memory before a run is submitted")
    s.add_argument("config", help="the run's config (TOML, or YAML named .yaml)")
    s.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value overrides, as for train")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=8, help="training processes per node")
    s.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=None,
        help="GB per GPU (default: the smallest GPU present; without one an assumed 80 GB, stated in the output)",
    )
    s.add_argument("--hashes", action="store_true", help="also re-hash every shard (reads all data)")
    s.set_defaults(func=_preflight)

    _add_synthesize(sub)
    from higgs_ds.eval.evaluate_cli import add_evaluate

    add_evaluate(sub, EXIT_CODES_HELP)

    s = sub.add_parser("demo", help="the whole pipeline on the bundled demo corpus with a tiny model (2 CPU ranks)")
    s.add_argument("--workdir", default=None, help="the demo's own folder (default runs/demo, runs/demo-v3)")
    s.add_argument("--steps", type=int, default=None, help="override max_steps of configs/demo.toml")
    s.add_argument(
        "--family",
        choices=ALL_FAMILIES,
        default=None,
        help="the model trained: this environment's Higgs-Audio v2 family (default), or v3: a tiny Higgs TTS 3 "
        "(native environment)",
    )
    s.set_defaults(func=_demo)
    return p


SYNTHESIZE_HELP = """\
Listen to a model: a model directory (a `higgs-ds export`, a converted or a base model, of this
environment's family) + text -> WAV files in --out (ID.wav, float32 mono at the codec's rate; ID.codes.npy,
the codes; synthesize.jsonl, a line per file with its text, references, seed and settings).

The prompt is built as training builds it (the same conversation a shard sample holds, boson's ChatML
tokens) and generated by the family's own loop (higgs_ds.eval.generate):

  plain TTS     --text "Hello there."
  cloning       --ref-audio me.wav --ref-text "what me.wav says" (encoded with the model's codec)
  scene         --scene "Audio is recorded in a quiet room." (boson's <|scene_desc_start|> block)
  dialogue      --text "[SPEAKER0] Hi. [SPEAKER1] Hello." and, to clone the voices, --ref-audio/--ref-text
                once per speaker, in order (the first is SPEAKER0)

The codec: --codec, else the local codec a native model's processor_config.json names, else the tiny
codec when the export's codec.json says it was trained on it. Sampling: temperature 0 is greedy; the same
seed and settings give the same audio on the same machine."""


def _add_synthesize(sub) -> None:
    from higgs_ds.eval.synth_request import DEFAULT_SYSTEM_PROMPT, JSONL_HELP

    s = sub.add_parser(
        "synthesize",
        help="model directory + text (or a JSONL of prompts) -> WAV files, with cloning, scene and dialogue",
        description=SYNTHESIZE_HELP,
        epilog=JSONL_HELP + "\n\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("model_dir", help="the model directory (config.json, safetensors weights, tokenizer)")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="the text to say ([SPEAKERn] tags for a dialogue)")
    what.add_argument("--batch", help="a JSONL of prompts, one per line (fields below)")
    s.add_argument("--out", required=True, help="the folder to write into (made if missing)")
    s.add_argument("--name", default=None, help="with --text: the output name, NAME.wav (synthesis)")
    s.add_argument("--ref-audio", action="append", help="a voice reference recording (once per speaker)")
    s.add_argument("--ref-text", action="append", help="the transcript of the --ref-audio at the same position")
    s.add_argument("--scene", default=None, help="a scene description (the system turn's scene block)")
    s.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="the system text (%(default)s)")
    s.add_argument("--codec", default=None, help="the codec directory the model was trained with, or 'tiny'")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda (cuda:N)")
    s.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="model weights dtype (auto: float32 on cpu, bfloat16 on cuda)",
    )
    s.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (0.7)")
    s.add_argument("--top-k", type=int, default=0, help="keep the k likeliest codes; 0: off (0)")
    s.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling; 1: off (0.95)")
    s.add_argument("--ras-win-len", type=int, default=7, help="repetition-aware sampling window; 0: off (7)")
    s.add_argument("--ras-max-repeat", type=int, default=2, help="repeats allowed in that window (2)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (0); a batch line's 'seed' replaces it")
    s.add_argument("--max-seconds", type=float, default=30.0, help="longest audio to generate (30)")
    s.add_argument("--max-frames", type=int, default=None, help="the same in codec frames (25 a second)")
    s.add_argument("--max-reference-seconds", type=float, default=30.0, help="refuse longer reference recordings (30)")
    s.add_argument("--overwrite", action="store_true", help="replace outputs that exist (default: refuse them)")
    s.set_defaults(func=_synthesize)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # the run config's own parser (argparse's REMAINDER drops a leading --help)
        from higgs_ds.train.run import main as train_main

        return train_main(argv[1:])
    args = parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (UserError, CheckFailed) as err:
        return report(err)


if __name__ == "__main__":
    sys.exit(main())
