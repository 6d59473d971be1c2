#!/usr/bin/env python3
"""Regenerate the ``shards/demo`` speech corpus (synthetic, espeak-ng).

What it makes (all under the output folder, default: this script's folder):

* ``audio/<speaker>_<NNN>.<ext>`` -- 48 utterances of the public-domain
  Harvard sentences (IEEE 1969), 16 per speaker, spoken by three clearly
  different espeak-ng voices:

      alice  en-us+f3            (female, American)
      bob    en-gb-scotland+m3   (male, Scottish)
      carol  en-gb-x-rp+f4       (female, British RP, higher/faster)

  Formats are deliberately mixed so that a loader is really exercised
  (per speaker, by utterance number):

      NNN in 004, 009, 014  -> WAV 16000 Hz mono   16-bit PCM
      NNN == 016            -> WAV 44100 Hz STEREO 16-bit PCM (2 equal channels)
      every other NNN       -> FLAC 22050 Hz mono  16-bit

* ``manifest.jsonl`` -- ChatML samples, audio paths relative to the manifest:
  one plain TTS sample per utterance (48 lines), then 4 voice-cloning samples
  per speaker (12 lines: reference transcript+audio and target of the same
  speaker, ``start_index`` 3).  ``misc.duration`` is the target audio length
  in seconds (``soxi -D``), rounded to 2 decimals.

How to run (needs only Python >= 3.11 stdlib plus the ``espeak-ng`` and ``sox``
executables; Debian: ``apt-get install -y --no-install-recommends espeak-ng sox``)::

    python3 shards/demo/make_corpus.py            # rewrites shards/demo/{audio,manifest.jsonl}
    python3 shards/demo/make_corpus.py --out DIR  # writes the same corpus into DIR

The output is deterministic: sox runs with ``-R`` (repeatable) and ``-D`` (no
dither), FLAC files carry no comment tags, and WAV files are written with
Python's ``wave`` module (plain 44-byte header, no metadata).  Two runs with the
same espeak-ng / sox / libFLAC versions give byte-identical files (this corpus
was made with espeak-ng 1.51 and SoX 14.4.2).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

SYSTEM_PROMPT = "Generate audio following instruction."

# speaker -> espeak-ng arguments (voice+variant, pitch 0-99, speed in words/min)
SPEAKERS: dict[str, list[str]] = {
    "alice": ["-v", "en-us+f3", "-p", "55", "-s", "170"],
    "bob": ["-v", "en-gb-scotland+m3", "-p", "35", "-s", "160"],
    "carol": ["-v", "en-gb-x-rp+f4", "-p", "70", "-s", "180"],
}
PER_SPEAKER = 16

# Harvard sentences, lists 1-5 (public domain); 48 are used, 16 per speaker
# (alice: 1-16, bob: 17-32, carol: 33-48).  The 16th of each block is one of
# the shortest sentences, because utterance 016 is the big 44.1 kHz stereo WAV.
SENTENCES = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "Two blue fish swam in the tank.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
    "The small pup gnawed a hole in the sock.",
    "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.",
    "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.",
    "A pot of tea helps to pass the evening.",
    "Her purse was full of useless trash.",
    "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.",
    "Take the winding path to reach the lake.",
    "Hoist the load to your left shoulder.",
    "Read verse out loud for pleasure.",
    "Note closely the size of the gas tank.",
    "Wipe the grease off his dirty face.",
    "Mend the coat before you go out.",
    "The wrist was badly strained and hung limp.",
    "The stray cat gave birth to kittens.",
    "The young girl gave no clear response.",
    "The meal was cooked before the bell rang.",
    "A king ruled the state in the early days.",
    "The ship was torn apart on the sharp reef.",
    "Sickness kept him home the third week.",
    "The wide road shimmered in the hot sun.",
    "The lazy cow lay in the cool grass.",
    "Lift the square stone over the fence.",
    "The rope will bind the seven books at once.",
    "Hop over the fence and plunge in.",
    "Mesh wire keeps chicks inside.",
]
assert len(SENTENCES) == len(SPEAKERS) * PER_SPEAKER

WAV16K_NUMS = {4, 9, 14}
STEREO_NUMS = {16}
# voice-cloning pairs (reference NNN, target NNN), same speaker; chosen so that
# references/targets cover FLAC, WAV 16 kHz and WAV 44.1 kHz stereo.
CLONE_PAIRS = [(2, 3), (4, 5), (8, 9), (16, 15)]

MIN_DUR, MAX_DUR = 1.5, 4.0


def fmt_for(num: int) -> tuple[str, int, int]:
    """(extension, sample rate, channels) for utterance number ``num``."""
    if num in STEREO_NUMS:
        return "wav", 44100, 2
    if num in WAV16K_NUMS:
        return "wav", 16000, 1
    return "flac", 22050, 1


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


def synth(speaker: str, text: str, num: int, tmp: Path, audio_dir: Path) -> Path:
    """Synthesize ``text`` and write it in the format assigned to ``num``."""
    raw_wav = tmp / "espeak.wav"
    run(["espeak-ng", *SPEAKERS[speaker], "-w", str(raw_wav), text])
    ext, rate, channels = fmt_for(num)
    out = audio_dir / f"{speaker}_{num:03d}.{ext}"
    # -R: repeatable, -D: no dither.  Effects: trim espeak's leading/trailing
    # silence (below -60 dBFS), keep 0.1 s of silence at each end, peak-normalise
    # to -3 dBFS.  Rate/channel conversion is added by sox from the output spec.
    effects = ["silence", "1", "0.02", "0.1%", "reverse",
               "silence", "1", "0.02", "0.1%", "reverse",
               "pad", "0.1", "0.1", "norm", "-3"]
    if ext == "flac":
        run(["sox", "-R", "-D", str(raw_wav), "--comment", "", "-C", "8",
             "-r", str(rate), "-c", str(channels), "-b", "16", str(out), *effects])
    else:
        pcm = run(["sox", "-R", "-D", str(raw_wav),
                   "-t", "raw", "-e", "signed-integer", "-b", "16", "-L",
                   "-r", str(rate), "-c", str(channels), "-", *effects]).stdout
        with wave.open(str(out), "wb") as w:
            w.setnchannels(channels)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(pcm)
    return out


def soxi_duration(path: Path) -> float:
    return float(run(["soxi", "-D", str(path)], text=True).stdout.strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                    help="output folder (default: this script's folder)")
    args = ap.parse_args()

    for tool in ("espeak-ng", "sox", "soxi"):
        if shutil.which(tool) is None:
            sys.exit(f"error: '{tool}' not found (apt-get install espeak-ng sox)")

    out_dir: Path = args.out
    audio_dir = out_dir / "audio"
    if audio_dir.exists():  # drop stale files so the folder matches the manifest
        for p in audio_dir.iterdir():
            if p.suffix in (".flac", ".wav"):
                p.unlink()
    audio_dir.mkdir(parents=True, exist_ok=True)

    # utt_id -> (speaker, text, relative path, duration)
    utts: dict[str, tuple[str, str, str, float]] = {}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for s_idx, speaker in enumerate(SPEAKERS):
            for num in range(1, PER_SPEAKER + 1):
                text = SENTENCES[s_idx * PER_SPEAKER + num - 1]
                path = synth(speaker, text, num, tmp, audio_dir)
                dur = round(soxi_duration(path), 2)
                if not MIN_DUR <= dur <= MAX_DUR:
                    sys.exit(f"error: {path.name} is {dur}s, outside "
                             f"[{MIN_DUR}, {MAX_DUR}]: {text!r}")
                utt_id = f"{speaker}_{num:03d}"
                utts[utt_id] = (speaker, text, path.relative_to(out_dir).as_posix(), dur)

    def audio_msg(rel: str) -> dict:
        return {"role": "assistant", "content": {"type": "audio", "audio_url": rel}}

    lines = []
    for utt_id, (speaker, text, rel, dur) in utts.items():
        lines.append({
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": text},
                audio_msg(rel),
            ],
            "speaker": speaker,
            "misc": {"id": utt_id, "duration": dur},
        })
    for speaker in SPEAKERS:
        for ref_num, tgt_num in CLONE_PAIRS:
            ref_id, tgt_id = f"{speaker}_{ref_num:03d}", f"{speaker}_{tgt_num:03d}"
            _, ref_text, ref_rel, _ = utts[ref_id]
            _, tgt_text, tgt_rel, tgt_dur = utts[tgt_id]
            lines.append({
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": ref_text},
                    audio_msg(ref_rel),
                    {"role": "user", "content": tgt_text},
                    audio_msg(tgt_rel),
                ],
                "speaker": speaker,
                "start_index": 3,
                "misc": {"id": f"clone_{tgt_id}", "duration": tgt_dur, "ref_id": ref_id},
            })

    ids = [ln["misc"]["id"] for ln in lines]
    assert len(ids) == len(set(ids)), "duplicate misc.id"
    with open(out_dir / "manifest.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for ln in lines:
            f.write(json.dumps(ln, ensure_ascii=False) + "\n")

    total = sum(u[3] for u in utts.values())
    print(f"wrote {len(utts)} utterances ({total:.2f} s) and {len(lines)} manifest "
          f"lines to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
