"""What a Higgs TTS 3 fine-tune must carry: the licence's terms, said once when training starts, and the
files an export of a Derivative Work needs.

Boson releases Higgs TTS 3 under the "BOSON HIGGS TTS 3 RESEARCH AND NON-COMMERCIAL LICENSE AGREEMENT"
(2026-07-08; docs/research/higgs-tts-3-facts.md): fine-tuning only for research or non-commercial purposes;
fine-tuned weights and LoRA adapters are Derivative Works, distributed only under the same licence, with its
text, a NOTICE, and the statement below; outputs may not train models other than Boson's; a cloned voice
needs its speaker's consent. higgs-ds does not ship the licence text: the export copies the base model
directory's own licence file (as downloaded from bosonai/higgs-tts-3-4b) and refuses without one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from higgs_ds.errors import UserError
from higgs_ds.models.trust import model_file

LICENCE_NAME = "Boson Higgs TTS 3 Research and Non-Commercial License Agreement"
DERIVED_STATEMENT = "Derived from Higgs TTS 3, licensed from Boson AI USA, Inc."
NOTICE_LINE = "Built with Higgs TTS 3 licensed from Boson AI USA, Inc."
LICENCE_FILES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE", "LICENCE.md", "LICENCE.txt")

TRAINING_TERMS = (
    f"Higgs TTS 3 is licensed under the {LICENCE_NAME}: fine-tune it only for research or non-commercial "
    "purposes; the fine-tuned weights and LoRA adapters are Derivative Works, to be shared only under the same "
    f'licence with its text, a NOTICE and the statement "{DERIVED_STATEMENT}"; its outputs may not train '
    "models other than Boson's; clone a voice only with its speaker's consent. Read the LICENSE file of the "
    "model directory for the binding text."
)

MODEL_CARD_TERMS = [
    "## Licence",
    "",
    f"{DERIVED_STATEMENT}",
    "",
    f"This model is a Derivative Work of Higgs TTS 3 under the {LICENCE_NAME} (the LICENSE file here). It is",
    "for research and non-commercial use only, and may be shared only under that licence, with LICENSE and",
    "NOTICE. Its outputs may not be used to train models other than Boson AI's. Cloning a voice needs the",
    "consent of the person whose voice it is.",
]


class LicenceError(UserError):
    pass


def licence_file(base_dir: str | Path) -> Path:
    """The licence text that came with the base model directory; a LicenceError when it has none."""
    for name in LICENCE_FILES:  # the file itself, or a Hugging Face cache snapshot's link into its blobs
        path = Path(base_dir) / name
        if model_file(path) is not None:
            return path
    raise LicenceError(
        f"{base_dir} has no LICENSE file: an export of a Higgs TTS 3 fine-tune must carry the licence text that "
        "came with bosonai/higgs-tts-3-4b; copy that LICENSE into the base model directory and export again"
    )


def write_licence_files(out_dir: Path, base_dir: str | Path) -> list[str]:
    """LICENSE (the base's, copied), NOTICE (the base's NOTICE, if any, then the Derivative Work's lines) into
    `out_dir`; returns the names written."""
    source = licence_file(base_dir)
    shutil.copyfile(model_file(source), out_dir / source.name)
    notice = model_file(Path(base_dir) / "NOTICE")
    lines = [NOTICE_LINE, DERIVED_STATEMENT, "Fine-tuned with higgs-ds; for research and non-commercial use only."]
    if notice is not None:
        carried = notice.read_text(encoding="utf-8", errors="replace").rstrip("\n")
        lines = [carried, ""] + [line for line in lines if line not in carried]
    (out_dir / "NOTICE").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [source.name, "NOTICE"]
