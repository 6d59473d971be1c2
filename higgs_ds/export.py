"""Stage 10 of the data flow: a training checkpoint -> a Hugging Face model directory.

    higgs-ds export OUTPUT_DIR/checkpoint-500 --out exported/   (or OUTPUT_DIR: its newest checkpoint)
    higgs-ds check-export exported/ --probe OUTPUT_DIR/probe.pt

Under ZeRO-3 the weights are partitioned across ranks; export consolidates them on the CPU from the
DeepSpeed partition files (fp32 master weights), so no GPU has to hold the whole model. The result is
safetensors + config + tokenizer + `codec.json` (the codec the shards were encoded with), and it loads
with `HiggsAudioModel.from_pretrained(DIR)`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from higgs_ds.checkpoint import is_complete, latest_complete
from higgs_ds.errors import UserError
from higgs_ds.model_patches import patch_for_training

COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


class ExportError(UserError):
    pass


def resolve_checkpoint(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ExportError(f"{p} is not a directory")
    if is_complete(p) and p.name.startswith("checkpoint-"):
        return p
    latest = latest_complete(p)
    if latest is None:
        raise ExportError(
            f"no complete checkpoint in {p} (looked for checkpoint-N with trainer_state.json and "
            "every rank's data state)"
        )
    return latest


def consolidated_state_dict(ckpt: Path, merge_lora: bool = False, base: str | None = None) -> tuple[dict, Path]:
    """The full model's weights and the directory its config and tokenizer come from."""
    if (ckpt / "adapter_config.json").is_file():
        if not merge_lora:
            raise ExportError(f"{ckpt} holds LoRA adapters: pass --merge-lora to merge them into the base model")
        return _merged_lora(ckpt, base), Path(
            base or json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"]
        )
    if (ckpt / "latest").is_file():  # DeepSpeed partitions: rebuild the fp32 weights on the CPU
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt)), ckpt
    weights = sorted(ckpt.glob("model*.safetensors"))
    if not weights:
        raise ExportError(f"{ckpt} holds neither DeepSpeed partitions (latest + global_step*/) nor model*.safetensors")
    from safetensors.torch import load_file

    state = {}
    for w in weights:
        state.update(load_file(w))
    return state, ckpt


def _merged_lora(ckpt: Path, base: str | None) -> dict:
    """Base model + the checkpoint's (gathered) adapters, merged with PEFT on the CPU."""
    import boson_multimodal.model.higgs_audio  # noqa: F401
    import torch
    from boson_multimodal.model.higgs_audio import HiggsAudioModel
    from peft import PeftModel

    base = base or json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"]
    if not Path(base, "config.json").is_file():
        raise ExportError(f"the LoRA base model {base} is not a model directory: pass --base DIR")
    model = patch_for_training(HiggsAudioModel.from_pretrained(base, torch_dtype=torch.float32))  # as in training
    merged = PeftModel.from_pretrained(model, str(ckpt)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _codec_note(ckpt: Path) -> dict | None:
    run_cfg = ckpt.parent / "higgs_ds_config.json"
    if not run_cfg.is_file():
        return None
    shards = json.loads(run_cfg.read_text())["data"]["shards"]
    notes = []
    for d in shards:
        index = Path(d) / "index.json"
        if index.is_file():
            notes.append(json.loads(index.read_text())["codec"])
    return {"trained_on_shards": shards, "codec": notes[0] if notes else None}


def export(
    checkpoint: str, out_dir: str, dtype: str | None = None, merge_lora: bool = False, base: str | None = None
) -> Path:
    import boson_multimodal.model.higgs_audio  # noqa: F401
    import torch
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
    from huggingface_hub import save_torch_state_dict

    ckpt = resolve_checkpoint(checkpoint)
    state, model_files = consolidated_state_dict(ckpt, merge_lora, base)
    config = HiggsAudioConfig.from_pretrained(model_files)
    with torch.device("meta"):
        expected = set(HiggsAudioModel(config).state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ExportError(
            f"consolidated weights of {ckpt} do not match its config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    target = getattr(torch, dtype) if dtype else torch.float32
    state = {k: v.to(target).contiguous() for k, v in state.items()}
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_torch_state_dict(state, tmp, max_shard_size="5GB")
    for name in COPIED_FILES:
        if (model_files / name).is_file():
            shutil.copy2(model_files / name, tmp / name)
    config.torch_dtype = str(target).removeprefix("torch.")
    config.save_pretrained(tmp)
    note = _codec_note(ckpt)
    if note:
        (tmp / "codec.json").write_text(json.dumps(note, indent=1) + "\n")
    (tmp / "higgs_ds_export.json").write_text(
        json.dumps({"checkpoint": str(ckpt.resolve()), "dtype": config.torch_dtype}, indent=1) + "\n"
    )
    (tmp / "README.md").write_text(model_card(ckpt, model_files, note, config.torch_dtype, merge_lora))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def model_card(ckpt: Path, model_files: Path, codec_note: dict | None, dtype: str, merged_lora: bool) -> str:
    """README.md of an exported directory: what it was trained from, on what, how far, and how to load it."""
    run_cfg_path = ckpt.parent / "higgs_ds_config.json"
    run_cfg = json.loads(run_cfg_path.read_text()) if run_cfg_path.is_file() else {}
    state = json.loads((ckpt / "trainer_state.json").read_text())
    last = next((h for h in reversed(state["log_history"]) if "audio_loss" in h), {})
    base = run_cfg.get("model", "?")
    lines = [
        "# Higgs-Audio v2 fine-tuned with higgs-ds",
        "",
        f"- base model: `{base}`" + (" (LoRA adapters merged)" if merged_lora else ""),
        f"- checkpoint: `{ckpt.resolve()}`, step {state.get('global_step')} of {state.get('max_steps')}",
        f"- final losses: total {last.get('loss')}, text {last.get('text_loss')}, audio {last.get('audio_loss')}",
        f"- weights: {dtype}",
        "",
        "## Data",
        "",
    ]
    for d in run_cfg.get("data", {}).get("shards", []):
        index_path = Path(d) / "index.json"
        if index_path.is_file():
            index = json.loads(index_path.read_text())
            digest = hashlib.sha256(index_path.read_bytes()).hexdigest()
            lines.append(
                f"- `{d}`: {index['num_samples']} samples, {index['audio_seconds'] / 3600:.3f} h of audio, "
                f"{len(index['shards'])} shards, index.json sha256 {digest}"
            )
    if codec_note and codec_note.get("codec"):
        codec = codec_note["codec"]
        lines += [
            "",
            f"Audio codec: {codec.get('codec')} (weights sha256 {codec.get('weights_sha256')}), "
            f"{codec.get('sample_rate')} Hz, {codec.get('frame_rate')} frames/s, {codec.get('num_codebooks')} "
            "codebooks: generate with this codec.",
        ]
    lines += [
        "",
        "## Training config",
        "",
        "```json",
        json.dumps(run_cfg, indent=1),
        "```",
        "",
        "## Loading",
        "",
        "```python",
        "import boson_multimodal.model.higgs_audio  # registers the model type",
        "from boson_multimodal.model.higgs_audio import HiggsAudioModel",
        "from transformers import AutoTokenizer",
        "",
        'model = HiggsAudioModel.from_pretrained("THIS_DIR")',
        'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")',
        "```",
        "",
    ]
    return "\n".join(lines)


def check_export(model_dir: str, probe_path: str, atol: float = 1e-5, rtol: float = 1e-4) -> dict:
    """Reload an exported directory and compare its logits with those the trained model produced
    (torch.allclose semantics: |a - b| <= atol + rtol * |b| everywhere)."""
    import boson_multimodal.model.higgs_audio  # noqa: F401
    import torch
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from higgs_ds.collate import model_inputs

    probe = torch.load(probe_path, map_location="cpu", weights_only=True)
    model = HiggsAudioModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(**model_inputs(probe["batch"]))
    pairs = ((out.logits.float(), probe["logits"]), (out.audio_logits.float(), probe["audio_logits"]))
    return {
        "max_abs_diff_logits": (pairs[0][0] - pairs[0][1]).abs().max().item(),
        "max_abs_diff_audio_logits": (pairs[1][0] - pairs[1][1]).abs().max().item(),
        "equal": all(torch.allclose(a, b, atol=atol, rtol=rtol) for a, b in pairs),
        "atol": atol,
        "rtol": rtol,
    }
