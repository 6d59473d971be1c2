"""Boson's own tokenization of ChatML samples, for tests/test_chatml.py (runs in the boson environment).

    python tests/reference/boson_chatml.py SAMPLES.json OUT.json

SAMPLES.json: a JSON list of samples. OUT.json: one entry per sample, in order: {"refused": true} where
boson's prepare_chatml_sample returns Nones or raises, else {"refused": false, "input_ids", "label_ids",
"audio": [the fields of each audio content, in order], "speaker"}; the tokenizer is
higgs_ds.models.tiny.build_tiny_tokenizer(). Plain JSON only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from higgs_ds.models.tiny import build_tiny_tokenizer  # noqa: E402


def boson_tokens(sample, tokenizer) -> dict:
    from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample

    try:  # it prints and returns Nones on most errors; printing a dataclass sample raises instead
        with contextlib.redirect_stdout(io.StringIO()):
            input_ids, label_ids, audio, speaker = prepare_chatml_sample(copy.deepcopy(sample), tokenizer)
    except Exception as err:  # noqa: BLE001 - a refusal, whatever boson raised
        return {"refused": True, "error": f"{type(err).__name__}: {err}"[:300]}
    if input_ids is None:
        return {"refused": True, "error": "returned None"}
    audio = [dataclasses.asdict(item) for item in audio]
    return {"refused": False, "input_ids": input_ids, "label_ids": label_ids, "audio": audio, "speaker": speaker}


def main(samples_path: str, out_path: str) -> None:
    tokenizer = build_tiny_tokenizer()
    samples = json.loads(Path(samples_path).read_text())
    Path(out_path).write_text(json.dumps([boson_tokens(s, tokenizer) for s in samples]))


if __name__ == "__main__":
    main(*sys.argv[1:])
