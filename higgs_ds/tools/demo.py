"""`higgs-ds demo` (what `make demo` runs): the whole pipeline on the bundled corpus, on 2 CPU ranks.

    tiny model -> shards of the demo corpus (tiny codec), 10% held out -> 2-rank ZeRO-3 training through
    SWIFT (launch/torchrun.sh) -> export -> reload the export in a fresh process and compare logits ->
    `higgs-ds evaluate` of the base tiny model against the fine-tune on the held-out prompts (tiny judges)

The model is this environment's Higgs-Audio v2 family (the native one in `.venv`, whose export is also
converted to boson's format and reloaded in `.venv-boson` where it exists), or with `--family v3` a tiny
Higgs TTS 3 in its released layout (native environment; exported with its licence files).

Each step prints what it does and where its output went; the model and shards are reused when they
already exist, training and export run anew.

The workdir is the demo's own: a new or empty folder, marked with `higgs_ds_demo.json` on first use. A
non-empty folder without that marker is refused (the demo replaces `WORKDIR/train`, and must never delete
a folder it did not make); so is a `train` entry that is not a plain folder (a symlink elsewhere), and a
workdir made by the demo of the other family (its model and shards are that family's).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from higgs_ds.errors import UserError
from higgs_ds.models.family import BOSON, ENVIRONMENT_HELP, NATIVE, TRAINED_IN, V3, environment_family
from higgs_ds.safe_io import atomic_write_json

REPO = Path(__file__).resolve().parents[2]
DEMO_MANIFEST = REPO / "shards" / "demo" / "manifest.jsonl"
DEMO_MARKER = "higgs_ds_demo.json"
DEMO_SPLIT = "0.1"  # held out for `higgs-ds evaluate` (by a hash of the sample id)
FAMILY_NAMES = {NATIVE: "Higgs-Audio v2 (native)", BOSON: "Higgs-Audio v2 (boson's classes)", V3: "Higgs TTS 3"}


def _say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], log_path: Path, env: dict, echo_prefix: str | None = None) -> None:
    """Run a step; its full output goes to log_path, lines starting with echo_prefix are shown."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        for line in proc.stdout:
            log.write(line)
            if echo_prefix and echo_prefix in line:  # after any progress-bar text on the same line
                print("    " + line[line.index(echo_prefix) :].rstrip(), flush=True)
        proc.wait()
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(
            f"step failed (exit {proc.returncode}): {' '.join(cmd)}\n--- last lines of {log_path}:\n{tail}"
        )


def default_workdir(family: str | None) -> str:
    return "runs/demo-v3" if family == V3 else "runs/demo"


def demo_family(family: str | None) -> str:
    """The family the demo trains: this environment's v2 family, or v3 where this environment trains it."""
    here = environment_family()
    if family in (None, here):
        return here
    if family not in TRAINED_IN:
        raise UserError(f"--family {family!r}: expected one of {sorted(TRAINED_IN)}")
    if TRAINED_IN[family] != here:
        raise UserError(
            f"the {family} demo trains in the {TRAINED_IN[family]} environment and this one is {here}'s: "
            f"run it with {ENVIRONMENT_HELP[TRAINED_IN[family]]}"
        )
    return family


def _marked_family(marker: Path) -> str | None:
    """The family a previous demo run recorded in its marker (None: unreadable; a marker before the
    family was recorded is the native family's)."""
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return recorded.get("family", NATIVE) if isinstance(recorded, dict) else None


def prepare_workdir(workdir: str | os.PathLike, family: str | None = None) -> Path:
    """The demo's workdir, made and marked if new; refused if it holds anything the demo did not make,
    or what the demo made for another family."""
    work = Path(workdir).resolve()
    if work.exists() and not work.is_dir():
        raise UserError(f"demo workdir {work} is not a folder: pass --workdir with a new or empty folder")
    marker = work / DEMO_MARKER
    if work.is_dir() and any(work.iterdir()) and not (marker.is_file() and not marker.is_symlink()):
        raise UserError(
            f"demo workdir {work} is not empty and is not a previous demo run (no {DEMO_MARKER}); the demo "
            "replaces folders in its workdir, so it refuses this one: pass --workdir with a new or empty folder"
        )
    family = family or environment_family()
    if marker.is_file() and _marked_family(marker) != family:
        raise UserError(
            f"demo workdir {work} holds the demo of the {_marked_family(marker) or 'unknown'} family, and this "
            f"run is the {family} demo's: pass --workdir with a new or empty folder (default {default_workdir(family)})"
        )
    work.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        note = {"made_by": "higgs-ds demo", "note": "this folder holds only demo outputs", "family": family}
        atomic_write_json(marker, note)
    return work


def _fresh_train_dir(work: Path) -> Path:
    """WORKDIR/train, emptied: the previous demo run's training output, never anything else."""
    train_dir = work / "train"
    if train_dir.is_symlink() or (train_dir.exists() and not train_dir.is_dir()):
        raise UserError(
            f"{train_dir} is not a folder the demo made (a symlink or a file): move it away and run the demo again"
        )
    if train_dir.exists():
        shutil.rmtree(train_dir)  # in a marked workdir, made by an earlier run of the demo
    return train_dir


def run_demo(workdir: str | None = None, steps: int | None = None, family: str | None = None) -> int:
    family = demo_family(family)
    work = prepare_workdir(workdir or default_workdir(family), family)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    started = time.time()

    model_dir = work / "tiny-model"
    if not (model_dir / "config.json").is_file():
        _say(f"writing a tiny random-weight {FAMILY_NAMES[family]} model to {model_dir}")
        from higgs_ds.models.tiny import write_tiny

        write_tiny(model_dir, family=family)
    else:
        _say(f"tiny model: {model_dir} (exists)")

    shard_dir, heldout_dir = work / "shards-train", work / "shards-heldout"
    for part, out in (("train", shard_dir), ("heldout", heldout_dir)):
        _build_part(model_dir, part, out)

    train_dir = _fresh_train_dir(work)
    overrides = [
        "--model",
        str(model_dir),
        "--output_dir",
        str(train_dir),
        "--data.shards",
        json.dumps([str(shard_dir)]),
    ]
    if steps:
        overrides += ["--max_steps", str(steps), "--save_steps", str(steps)]
    train_env = dict(env, NPROC_PER_NODE="2", PYTHON=sys.executable, MASTER_PORT=str(_free_port()))
    _say(f"training on 2 CPU ranks with DeepSpeed ZeRO-3 through ms-swift (full log: {work / 'train.log'})")
    _run(
        ["bash", str(REPO / "launch" / "torchrun.sh"), str(REPO / "configs" / "demo.toml"), *overrides],
        work / "train.log",
        train_env,
        echo_prefix="[higgs-ds]",
    )

    history = [h for h in _log_history(train_dir) if "audio_loss" in h]
    first, last = history[0], history[-1]
    audio = f"step {first['step']} {first['audio_loss']:.3f} -> step {last['step']} {last['audio_loss']:.3f}"
    text = f"text loss {first['text_loss']:.3f} -> {last['text_loss']:.3f}"
    _say(f"audio loss: {audio}; {'no text loss (Higgs TTS 3 trains audio only)' if family == V3 else text}")

    export_dir = work / "export"
    _say(f"exporting the last checkpoint of {train_dir} to {export_dir}")
    _run(
        [sys.executable, "-m", "higgs_ds.cli", "export", str(train_dir), "--out", str(export_dir)],
        work / "export.log",
        env,
    )
    _say("reloading the export in a fresh process and comparing logits with the trained model's")
    _run(
        [sys.executable, "-m", "higgs_ds.cli", "check-export", str(export_dir), "--probe", str(train_dir / "probe.pt")],
        work / "check.log",
        env,
    )
    check = json.loads((work / "check.log").read_text().strip().splitlines()[-1])
    _say(
        f"export logits equal: {check['equal']} (max abs diff {check['max_abs_diff_logits']:.2e} text, "
        f"{check['max_abs_diff_audio_logits']:.2e} audio)"
    )
    boson_ok = _boson_round(work, train_dir, export_dir, env) if family == NATIVE else None
    _evaluate(work, model_dir, export_dir, heldout_dir, env)
    ok = check["equal"] and last["audio_loss"] < first["audio_loss"] and boson_ok is not False
    _say(
        f"{'done' if ok else 'FAILED'} in {time.time() - started:.0f} s. Outputs: model {model_dir}, "
        f"shards {shard_dir} (held out: {heldout_dir}), checkpoints and TensorBoard logs {train_dir}, "
        f"export {export_dir}, evaluation {work / 'evaluation'}"
    )
    return 0 if ok else 1


def _build_part(model_dir: Path, part: str, out: Path) -> None:
    """One part of the demo corpus's held-out split (`shards build --split 0.1`), built once."""
    if (out / "index.json").is_file():
        _say(f"{part} shards: {out} (exist)")
        return
    _say(f"building the {part} part ({DEMO_SPLIT} held out) of {DEMO_MANIFEST.relative_to(REPO)} into {out}")
    from higgs_ds.shards.build import BuildConfig, build_shards

    cfg = BuildConfig(shard_samples=8, tokenizer=str(model_dir), split=DEMO_SPLIT, split_part=part)
    summary = build_shards([str(DEMO_MANIFEST)], str(out), "tiny", cfg)
    _say(
        f"{part} shards: {summary['accepted']} samples accepted, {summary['rejected']} rejected, "
        f"{summary['split']['other_part']} in the other part, {summary['shards']} shards, "
        f"{summary['audio_hours'] * 60:.1f} audio-minutes, {summary['wall_seconds']} s"
    )


def _evaluate(work: Path, model_dir: Path, export_dir: Path, heldout_dir: Path, env: dict) -> None:
    """The base tiny model against the fine-tune on the held-out prompts, judged by tiny random-weight
    judges: the workflow of README "Is my voice better?", whose numbers here say nothing of quality."""
    judges = work / "judges"
    if not (judges / "mos").is_dir():
        from higgs_ds.eval.tiny_judges import write_tiny_judges

        write_tiny_judges(judges)
    out = work / "evaluation"
    _say(f"evaluating the fine-tune against the base model on the held-out prompts: {out}")
    _say("(tiny random-weight judges: the numbers exercise the metrics and say nothing about quality)")
    judged = [f"--{kind}={judges / kind}" for kind in ("asr", "speaker", "mos")]
    cmd = [sys.executable, "-m", "higgs_ds.cli", "evaluate", str(export_dir), "--base", str(model_dir),
           "--set", str(heldout_dir), "--out", str(out), "--codec", "tiny", "--max-seconds", "6", *judged]  # fmt: skip
    _run(cmd, work / "evaluate.log", env)
    for line in (out / "evaluation.md").read_text().splitlines():
        print("    " + line, flush=True)


def _boson_python() -> Path | None:
    path = Path(os.environ.get("HIGGS_DS_BOSON_PYTHON") or REPO / ".venv-boson" / "bin" / "python")
    return path if path.is_file() else None


def _boson_round(work: Path, train_dir: Path, export_dir: Path, env: dict) -> bool | None:
    """The native export converted to boson's format and, where boson's environment exists (`make boson`),
    reloaded there with boson's HiggsAudioModel: its logits on the probe's samples, laid out by boson's
    collator, must equal the trained model's. None when there is no boson environment to check in."""
    boson_dir = work / "export-boson"
    if boson_dir.exists():
        shutil.rmtree(boson_dir)  # made by this demo inside its own marked workdir
    _say(f"converting the export to boson's format: {boson_dir}")
    _run(
        [sys.executable, "-m", "higgs_ds.cli", "convert", str(export_dir), "--to", "boson", "--out", str(boson_dir)],
        work / "convert.log",
        env,
    )
    python = _boson_python()
    if python is None:
        _say("no boson environment (.venv-boson; `make boson` makes it): the boson-format export is not reloaded")
        return None
    _say(f"reloading it with boson's HiggsAudioModel in {python.parent.parent.name} and comparing logits")
    _run(
        [str(python), "-m", "higgs_ds.tools.boson_check", str(boson_dir), "--run", str(train_dir)],
        work / "boson_check.log",
        env,
    )
    result = json.loads((work / "boson_check.log").read_text().strip().splitlines()[-1])
    _say(
        f"boson-format logits equal: {result['equal']} ({result['positions']} positions, max abs diff "
        f"{result['max_abs_diff_logits']:.2e} text, {result['max_abs_diff_audio_logits']:.2e} audio)"
    )
    return bool(result["equal"])


def _log_history(train_dir: Path) -> list[dict]:
    state = sorted(train_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not state:
        raise SystemExit(f"no checkpoint with trainer_state.json in {train_dir}")
    return json.loads(state[-1].read_text())["log_history"]
