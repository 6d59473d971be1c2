"""Stage 10 of the data flow: a training checkpoint -> a Hugging Face model directory.

    higgs-ds export OUTPUT_DIR/checkpoint-500 --out exported/   (or OUTPUT_DIR: its newest checkpoint)
    higgs-ds check-export exported/ --probe OUTPUT_DIR/probe.pt

Under ZeRO-3 the weights are partitioned across ranks; export consolidates them on the CPU from the
DeepSpeed partition files (fp32 master weights), so no GPU has to hold the whole model. The result is
safetensors + config + tokenizer + `codec.json` (the codec the shards were encoded with), and it loads
with `HiggsAudioModel.from_pretrained(DIR)`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from higgs_ds.checkpoint import is_complete, latest_complete
from higgs_ds.errors import UserError

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


def consolidated_state_dict(ckpt: Path) -> dict:
    if (ckpt / "adapter_config.json").is_file():
        raise ExportError(
            f"{ckpt} is a LoRA adapter checkpoint; merging adapters into the base model is not "
            "implemented yet in higgs-ds export"
        )
    if (ckpt / "latest").is_file():  # DeepSpeed partitions: rebuild the fp32 weights on the CPU
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    weights = sorted(ckpt.glob("model*.safetensors"))
    if not weights:
        raise ExportError(f"{ckpt} holds neither DeepSpeed partitions (latest + global_step*/) nor model*.safetensors")
    from safetensors.torch import load_file

    state = {}
    for w in weights:
        state.update(load_file(w))
    return state


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


def export(checkpoint: str, out_dir: str, dtype: str | None = None) -> Path:
    import boson_multimodal.model.higgs_audio  # noqa: F401
    import torch
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
    from huggingface_hub import save_torch_state_dict

    ckpt = resolve_checkpoint(checkpoint)
    config = HiggsAudioConfig.from_pretrained(ckpt)
    state = consolidated_state_dict(ckpt)
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
        if (ckpt / name).is_file():
            shutil.copy2(ckpt / name, tmp / name)
    config.torch_dtype = str(target).removeprefix("torch.")
    config.save_pretrained(tmp)
    note = _codec_note(ckpt)
    if note:
        (tmp / "codec.json").write_text(json.dumps(note, indent=1) + "\n")
    (tmp / "higgs_ds_export.json").write_text(
        json.dumps({"checkpoint": str(ckpt.resolve()), "dtype": config.torch_dtype}, indent=1) + "\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def check_export(model_dir: str, probe_path: str, atol: float = 1e-5) -> dict:
    """Reload an exported directory and compare its logits with those the trained model produced."""
    import boson_multimodal.model.higgs_audio  # noqa: F401
    import torch
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    probe = torch.load(probe_path, map_location="cpu", weights_only=True)
    model = HiggsAudioModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    from higgs_ds.collate import model_inputs

    batch = model_inputs(probe["batch"])
    with torch.no_grad():
        out = model(**batch)
    diff_text = (out.logits.float() - probe["logits"]).abs().max().item()
    diff_audio = (out.audio_logits.float() - probe["audio_logits"]).abs().max().item()
    return {
        "max_abs_diff_logits": diff_text,
        "max_abs_diff_audio_logits": diff_audio,
        "equal": max(diff_text, diff_audio) <= atol,
        "atol": atol,
    }
