"""The `higgs-ds` command: a thin shell over the library functions (which the tests call directly)."""

from __future__ import annotations

import argparse
import json
import sys

from higgs_ds.errors import UserError


def _tiny_model(args):
    from higgs_ds.tiny import write_tiny_model

    print(f"wrote {write_tiny_model(args.out_dir, seed=args.seed)}")


def _tiny_codec(args):
    from higgs_ds.codec import write_tiny_codec

    print(f"wrote {write_tiny_codec(args.out_dir, seed=args.seed)}")


def _shards_build(args):
    from higgs_ds.codec import resolve_codec
    from higgs_ds.shard_build import BuildConfig, build_shards

    codec = resolve_codec(args.codec, device=args.device)
    cfg = BuildConfig(max_seconds=args.max_seconds, shard_samples=args.shard_samples, fast_fail=args.fast_fail)
    summary = build_shards(args.manifests, args.out, codec, cfg)
    print(json.dumps(summary, indent=1))


def _train(args):
    from higgs_ds.train import main as train_main

    return train_main(args.rest)


def _export(args):
    from higgs_ds.export import export

    print(f"exported {export(args.checkpoint, args.out, dtype=args.dtype)}")


def _check_export(args):
    from higgs_ds.export import check_export

    result = check_export(args.model_dir, args.probe, atol=args.atol)
    print(json.dumps(result))
    return 0 if result["equal"] else 1


def _demo(args):
    from higgs_ds.demo import run_demo

    return run_demo(args.workdir, steps=args.steps)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="higgs-ds", description="Fine-tune Higgs-Audio v2: shards, training, export.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("tiny-model", help="write a tiny random-weight HiggsAudioModel + tokenizer (offline)")
    s.add_argument("out_dir")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_tiny_model)

    s = sub.add_parser("tiny-codec", help="write a tiny random-weight Higgs audio codec directory (offline)")
    s.add_argument("out_dir")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_tiny_codec)

    shards = sub.add_parser("shards", help="build WebDataset shards of codec codes").add_subparsers(
        dest="shards_command", required=True, metavar="SUBCOMMAND"
    )
    s = shards.add_parser(
        "build",
        help="manifest(s) -> audio -> codec codes -> tar shards + index.json",
        description="Decode, resample to 24 kHz and encode every audio item once; write "
        "shards, index.json and rejects.jsonl (every line not written, with its reason).",
    )
    s.add_argument("manifests", nargs="+", help="ChatML or plain-TTS JSONL manifests")
    s.add_argument("--out", required=True, help="output shard directory")
    s.add_argument("--codec", required=True, help="codec directory (config.json + model.pth), or 'tiny'")
    s.add_argument("--max-seconds", type=float, default=30.0, help="reject audio items longer than this")
    s.add_argument("--shard-samples", type=int, default=1000, help="samples per shard")
    s.add_argument("--fast-fail", action="store_true", help="stop at the first bad sample")
    s.add_argument("--device", default="cpu", help="codec device: cpu or cuda")
    s.set_defaults(func=_shards_build)

    s = sub.add_parser("train", help="train through ms-swift + DeepSpeed (run under torchrun)", add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=_train)

    s = sub.add_parser("export", help="checkpoint -> Hugging Face model directory (ZeRO-3 consolidated on CPU)")
    s.add_argument("checkpoint", help="checkpoint-N directory, or an output dir (its newest complete checkpoint)")
    s.add_argument("--out", required=True)
    s.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights dtype (float32)")
    s.set_defaults(func=_export)

    s = sub.add_parser("check-export", help="reload an export and compare its logits with the trained model's")
    s.add_argument("model_dir")
    s.add_argument("--probe", required=True, help="probe.pt written by training with save_probe = true")
    s.add_argument("--atol", type=float, default=1e-5)
    s.set_defaults(func=_check_export)

    s = sub.add_parser("demo", help="the whole pipeline on the bundled demo corpus with a tiny model (2 CPU ranks)")
    s.add_argument("--workdir", default="runs/demo")
    s.add_argument("--steps", type=int, default=None, help="override max_steps of configs/demo.toml")
    s.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as err:
        print(f"higgs-ds {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
