"""boson's side of the model-conversion checks (tests/test_convert.py, tests/test_model_layouts.py).

Run in the boson environment (boson_multimodal 0.1.1, transformers 4.46.3); writes plain data only
(safetensors directories, .json, .npz):

    python tests/reference/boson_model.py build OUT
        OUT/tiny, OUT/tiny_bf16     tiny HiggsAudioModel directories (float32 / bfloat16 weights)
        OUT/tiny_split              OUT/tiny's weights saved while partially frozen, by boson's own classes:
                                    freeze_llm(freeze_embed_until_idx) / freeze_text_head(freeze_text_head_until_idx)
                                    and a PartiallyFrozenLinear audio head (the halves transformers' converter joins)
        OUT/release_layout          laid out like revision 10840182 of the release: sharded safetensors +
                                    model.safetensors.index.json, config.json, generation_config.json, tokenizer
        OUT/cfg_bias, cfg_release, cfg_native_rope    config + tokenizer only (q/k/v/o and MLP biases; the
                                    released Llama-3.2-3B sizes; the native default llama3 rope in boson's spelling)
        OUT/facts.json              class defaults, each directory's state-dict shapes (meta device), whether a
                                    tie_word_embeddings=true text_config ties text_lm_head to embed_tokens
        OUT/rope.npz                each directory's inverse rope frequencies, from the LlamaRotaryEmbedding
                                    HiggsAudioModel builds
    python tests/reference/boson_model.py load OUT.json DIR...
        per DIR: higgs_ds.models.strict.check_state_dict_matches against HiggsAudioModel's state dict, then
        HiggsAudioModel.from_pretrained's loading info (or its exception), and the text logits on TEXT_IDS
        (OUT.npz, key = the DIR's index)
    python tests/reference/boson_model.py export RUN OUT
        higgs-ds export of RUN's newest checkpoint in boson's format
"""

from __future__ import annotations

import inspect
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import boson_multimodal.model.higgs_audio  # noqa: E402,F401  registers the model type
from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel  # noqa: E402
from boson_multimodal.model.higgs_audio.custom_modules import PartiallyFrozenLinear  # noqa: E402
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

from higgs_ds.models.tiny import RELEASED_TEXT, TINY_TEXT, build_tiny_tokenizer, model_config, write_tiny_model  # noqa: E402

# A text-only prompt of the tiny tokenizer's ids (bytes and Llama-3 headers), 8 long: boson pads to 8.
TEXT_IDS = [256, 262, 97, 115, 263, 10, 104, 105]
PROBE = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nSay hé!<|eot_id|><|audio_out_bos|><|AUDIO_OUT|>"
FLOAT = torch.float32
SPLIT_AT = 200  # rows of embed_tokens / text_lm_head kept frozen; 1026 = codebook 0 of the audio head
NATIVE_DEFAULT_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 0.125, "high_freq_factor": 0.5,
                       "original_max_position_embeddings": 1024}  # fmt: skip


def _defaults(cls) -> dict:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _shapes(config) -> dict:
    with torch.device("meta"):
        model = HiggsAudioModel(config)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _config_dir(out: Path, text: dict, tokenizer) -> Path:
    out.mkdir(parents=True)
    model_config(tokenizer, text).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _split(tiny: Path, out: Path, tokenizer) -> None:
    model = HiggsAudioModel.from_pretrained(tiny, torch_dtype=torch.float32)
    model.freeze_llm(freeze_embed=True, freeze_embed_until_idx=SPLIT_AT)
    model.freeze_text_head(freeze_text_head_until_idx=SPLIT_AT)
    proj = model.audio_decoder_proj
    proj.audio_lm_head = PartiallyFrozenLinear(proj.audio_lm_head, freeze_until_idx=1026)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _ties(tiny: Path, out: Path) -> bool:
    """Does text_config.tie_word_embeddings=true make text_lm_head embed_tokens? (The release says true.)"""
    shutil.copytree(tiny, out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(config))
    model = HiggsAudioModel.from_pretrained(out)
    head, embed = model.audio_decoder_proj.text_lm_head.weight, model.embed_tokens.weight
    return head.data_ptr() == embed.data_ptr() or bool(torch.equal(head, embed))


def build(out: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    tiny = write_tiny_model(out / "tiny", seed=0)
    write_tiny_model(out / "tiny_bf16", seed=1, dtype="bfloat16")
    _split(tiny, out / "tiny_split", tokenizer)
    release = out / "release_layout"
    torch.manual_seed(2)
    HiggsAudioModel(model_config(tokenizer)).save_pretrained(release, safe_serialization=True, max_shard_size="2MB")
    tokenizer.save_pretrained(release)
    _config_dir(out / "cfg_bias", dict(TINY_TEXT, attention_bias=True, mlp_bias=True), tokenizer)
    _config_dir(out / "cfg_release", RELEASED_TEXT, tokenizer)
    _config_dir(out / "cfg_native_rope", dict(TINY_TEXT, rope_scaling=NATIVE_DEFAULT_ROPE), tokenizer)
    names = ["tiny", "tiny_bf16", "tiny_split", "release_layout", "cfg_bias", "cfg_release", "cfg_native_rope"]
    configs = {name: HiggsAudioConfig.from_pretrained(out / name) for name in names}
    facts = {
        "defaults": {"higgs_audio": _defaults(HiggsAudioConfig), "llama": _defaults(LlamaConfig)},
        "shapes": {name: _shapes(config) for name, config in configs.items()},
        "tie_word_embeddings_ties": _ties(tiny, out / "tied"),
    }
    (out / "facts.json").write_text(json.dumps(facts, indent=1))
    rope = {name: LlamaRotaryEmbedding(config=c.text_config).inv_freq.numpy() for name, c in configs.items()}
    np.savez(out / "rope.npz", **rope)


def _strict(model_dir: Path) -> str | None:
    from higgs_ds.errors import UserError
    from higgs_ds.models.strict import check_state_dict_matches

    expected = {k: tuple(v) for k, v in _shapes(HiggsAudioConfig.from_pretrained(model_dir)).items()}
    try:
        check_state_dict_matches(model_dir, expected, "HiggsAudioModel")
    except UserError as err:
        return str(err)
    return None


def _tokens(model_dir: Path) -> dict:
    """How the directory's tokenizer, loaded by transformers 4.46, tokenizes PROBE, and its special tokens."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:  # noqa: BLE001  (recorded for the test to name)
        return {"error": f"{type(err).__name__}: {err}"}
    ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    return {"ids": ids, "decoded": tokenizer.decode(ids, skip_special_tokens=True), "bos": tokenizer.bos_token,
            "eos": tokenizer.eos_token, "pad": tokenizer.pad_token, "vocab": len(tokenizer)}  # fmt: skip


def load(out: Path, dirs: list[Path]) -> None:
    results, logits = [], {}
    for i, model_dir in enumerate(dirs):
        error = _strict(model_dir)
        try:  # boson's own loader, to show what it does without the strict check
            model, info = HiggsAudioModel.from_pretrained(model_dir, torch_dtype=FLOAT, output_loading_info=True)
        except Exception as err:  # noqa: BLE001  (a directory broken on purpose: recorded, not fatal)
            failed = f"{type(err).__name__}: {err}"
            results.append({"dir": str(model_dir), "strict_error": error, "load_error": failed})
            continue
        ids = torch.tensor([TEXT_IDS])
        with torch.no_grad():
            output = model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        logits[str(i)] = output.logits.numpy()
        info = {k: sorted(map(str, v)) for k, v in info.items()}
        results.append({"dir": str(model_dir), "strict_error": error, "tokens": _tokens(model_dir), **info})
    Path(out).write_text(json.dumps(results, indent=1))
    np.savez(Path(out).with_suffix(".npz"), **logits)


def export(run: Path, out: Path) -> None:
    from higgs_ds.tools import export as exporter

    kwargs = {"fmt": "boson"} if "fmt" in inspect.signature(exporter.export).parameters else {}
    exporter.export(str(run), str(out), **kwargs)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "build":
        build(Path(args[0]))
    elif command == "load":
        load(Path(args[0]), [Path(a) for a in args[1:]])
    elif command == "export":
        export(Path(args[0]), Path(args[1]))
    else:
        sys.exit(f"unknown command {command!r}")
