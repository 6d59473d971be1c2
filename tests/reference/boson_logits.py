"""Boson's reference logits and loss for tests/test_native_equivalence.py (runs in the boson environment).

    python tests/reference/boson_logits.py OUT_DIR

writes OUT_DIR/boson_model (the tiny HiggsAudioModel, re-drawn at a scale where attention, rope and the
dual FFN visibly matter), OUT_DIR/reference.npz and OUT_DIR/reference.json: for every sample, boson's
prepare_chatml_sample tokens and labels and the random codes; for every batch (each sample alone, and
several together), what boson's HiggsAudioSampleCollator + HiggsAudioModel.forward give: text logits at the
attended positions (row-major), the expanded labels, input ids and audio masks there, audio logits,
label_audio_ids, and higgs_ds.train.loss.higgs_loss's total and terms; the samples' ChatML. Plain arrays and
JSON only.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from higgs_ds.models.tiny import build_tiny_tokenizer, write_tiny_model  # noqa: E402
from higgs_ds.stream.collate import boson_collate, make_collator, model_inputs  # noqa: E402
from higgs_ds.stream.tokens import EncodedSample  # noqa: E402
from higgs_ds.train.loss import higgs_loss  # noqa: E402

SYSTEM = "Generate audio following instruction."
SCENE = f"{SYSTEM}\n\n<|scene_desc_start|>\nAudio is recorded in a small room with a hum.\n<|scene_desc_end|>"
DIALOGUE_SCENE = (
    f"{SYSTEM}\n\n<|scene_desc_start|>\nSPEAKER0: a calm low voice\nSPEAKER1: a bright fast voice\n<|scene_desc_end|>"
)


def audio(name: str) -> dict:
    return {"type": "audio", "audio_url": f"audio/{name}.wav"}


def demo_lines(ids: list[str]) -> list[dict]:
    """Lines of the demo manifest (boson's ChatML form), as the shard builder keeps them in a record."""
    lines = [json.loads(x) for x in (REPO / "shards/demo/manifest.jsonl").read_text().splitlines() if x.strip()]
    by_id = {line["misc"]["id"]: line for line in lines}
    keep = ("messages", "speaker", "start_index", "misc")
    return [{k: by_id[i][k] for k in keep if k in by_id[i]} for i in ids]


def hand_made() -> list[dict]:
    """Multi-speaker dialogue, scene text in the system turn, audio-in, text-only, two assistant turns."""
    return [
        {  # multi-speaker dialogue: speaker tags, two audio-out turns
            "messages": [
                {"role": "system", "content": DIALOGUE_SCENE},
                {"role": "user", "content": "[SPEAKER0] Are you coming tonight? [SPEAKER1] Only if it stops raining."},
                {"role": "assistant", "content": audio("dialogue_0")},
                {"role": "user", "content": "[SPEAKER0] It will. [SPEAKER1] Then I will."},
                {"role": "assistant", "content": audio("dialogue_1")},
            ],
            "misc": {"id": "dialogue"},
        },
        {  # scene description in the system turn, plain TTS otherwise
            "messages": [
                {"role": "system", "content": SCENE},
                {"role": "user", "content": "The hum was louder than the voice."},
                {"role": "assistant", "content": audio("scene")},
            ],
            "speaker": "bob",
            "misc": {"id": "scene"},
        },
        {  # audio-in: the reference audio in the system turn (boson's --ref_audio_in_system_message) and a user clip
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": SYSTEM + " Speak like this: "}, audio("ref")]},
                {"role": "user", "content": [{"type": "text", "text": "Repeat after me:"}, audio("user_clip")]},
                {"role": "assistant", "content": audio("audio_in_target")},
            ],
            "misc": {"id": "audio_in"},
        },
        {  # text only: an assistant text reply is a text target, no audio anywhere
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Say hello."},
                {"role": "assistant", "content": "Hello there!"},
            ],
            "misc": {"id": "text_only"},
        },
        {  # two assistant turns in a row (<|eom_id|>), text then audio, with a recipient
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": "Answer, then read it."},
                {"role": "assistant", "content": "Yes.", "recipient": "tts"},
                {"role": "assistant", "content": audio("eom_audio")},
            ],
            "misc": {"id": "eom_recipient"},
        },
    ]


def encode(chatml: dict, tokenizer, rng) -> EncodedSample:
    from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample

    with contextlib.redirect_stdout(io.StringIO()):
        input_ids, label_ids, audio_contents, _ = prepare_chatml_sample(json.loads(json.dumps(chatml)), tokenizer)
    if input_ids is None:
        raise SystemExit(f"boson refused sample {chatml['misc']['id']}")
    frames = [int(t) for t in rng.integers(3, 12, size=len(audio_contents))]
    codes = rng.integers(0, 1024, size=(8, sum(frames))).astype(np.int64)
    return EncodedSample(chatml["misc"]["id"], np.asarray(input_ids), np.asarray(label_ids), codes, frames)


def redraw(model_dir: Path, seed: int) -> None:
    """Weights at a scale where every part matters: linear weights N(0, 1/fan_in) (activations of order 1,
    attention far from uniform, so rope and masking show), embeddings N(0, 1), norms 1 + N(0, 0.3) (so the
    text and audio norms of the dual FFN differ)."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    model = HiggsAudioModel.from_pretrained(str(model_dir))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * noise)
            elif "embed" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)
    model.save_pretrained(str(model_dir), safe_serialization=True)


def run_batch(model, collator, samples: list) -> dict:
    batch = boson_collate(collator, samples)
    with torch.no_grad():
        out = model(**model_inputs(batch))
    loss, metrics = higgs_loss(out.logits, out.expanded_labels, out.audio_logits, batch["label_audio_ids"])
    attended = out.attention_mask.bool()
    codes_mask = out.audio_in_discrete_codes_mask | out.audio_out_mask
    return {
        "text_logits": out.logits[attended].float().numpy(),
        "expanded_labels": out.expanded_labels[attended].numpy(),
        "expanded_input_ids": out.expanded_input_ids[attended].numpy(),
        "audio_codes_mask": codes_mask[attended].numpy(),
        "audio_out_mask": out.audio_out_mask[attended].numpy(),
        "rows": attended.sum(dim=1).numpy(),  # attended positions per sample
        "audio_logits": out.audio_logits.float().numpy(),
        "label_audio_ids": batch["label_audio_ids"].numpy(),
        "loss": np.array([float(loss), float(metrics["text_loss"]), float(metrics["audio_loss"])], np.float64),
    }


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = write_tiny_model(out_dir / "boson_model", seed=0)
    redraw(model_dir, seed=1)
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    model = HiggsAudioModel.from_pretrained(str(model_dir)).eval()
    tokenizer = build_tiny_tokenizer()
    rng = np.random.default_rng(2)
    chatml = demo_lines(["alice_001", "clone_alice_003", "clone_bob_009"]) + hand_made()
    samples = [encode(c, tokenizer, rng) for c in chatml]
    n = len(samples)
    # each alone (boson left-pads a batch of one inside its forward), all together, and an uneven pair
    batches = [[i] for i in range(n)] + [list(range(n)), [n - 1, 0]]
    collator = make_collator(model.config)
    arrays: dict[str, np.ndarray] = {}
    for i, s in enumerate(samples):
        arrays.update({f"s{i}_input_ids": s.input_ids, f"s{i}_label_ids": s.label_ids, f"s{i}_codes": s.codes})
        arrays[f"s{i}_frames"] = np.asarray(s.frames, np.int64)
    for j, members in enumerate(batches):
        for key, value in run_batch(model, collator, [samples[i] for i in members]).items():
            arrays[f"b{j}_{key}"] = value
    np.savez(out_dir / "reference.npz", **arrays)
    meta = {"sample_ids": [s.sample_id for s in samples], "batches": batches, "chatml": chatml}
    (out_dir / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
