"""higgs_ds.models.convert against both real classes (issue #11, check 3): boson -> native -> boson and
native -> boson -> native give bit-identical tensors and equivalent configs; the converted directories load
strictly in their own class; every refusal names the key or setting.

boson's side (tiny HiggsAudioModel directories, its class defaults, state-dict shapes, rope frequencies,
strict loads and text logits) comes from tests/reference/boson_model.py in the boson environment; the
native side is transformers 5's HiggsAudioV2ForConditionalGeneration here.
"""

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from higgs_ds.errors import UserError
from higgs_ds.models.family import BOSON, NATIVE
from tests.envs import REFERENCE, run_in_env

pytestmark = pytest.mark.native_env

BOSON_SCRIPT = REFERENCE / "boson_model.py"
SHAPE_DIRS = ["tiny", "tiny_bf16", "release_layout", "cfg_bias", "cfg_release", "cfg_native_rope"]
TEXT_IDS = [256, 262, 97, 115, 263, 10, 104, 105]  # boson_model.TEXT_IDS
PROBE = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nSay hé!<|eot_id|><|audio_out_bos|><|AUDIO_OUT|>"


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("boson-ref") / "ref"
    run_in_env(BOSON, [BOSON_SCRIPT, "build", out], timeout=300)
    return out


@pytest.fixture(scope="module")
def facts(ref) -> dict:
    return json.loads((ref / "facts.json").read_text())


@pytest.fixture(scope="module")
def native_tiny(tmp_path_factory) -> Path:
    from higgs_ds.models.native.tiny import write_tiny_native_model

    return write_tiny_native_model(tmp_path_factory.mktemp("native") / "tiny", seed=3, codec=None)


@pytest.fixture(scope="module")
def trips(ref, native_tiny, tmp_path_factory) -> dict:
    """Every conversion the round-trip tests look at, then one boson-environment load of the boson ones."""
    from higgs_ds.models.convert import convert_model

    root = tmp_path_factory.mktemp("trips")
    paths = {}
    for name in ("tiny", "tiny_bf16", "release_layout"):
        paths[f"{name}>n"] = convert_model(ref / name, NATIVE, root / f"{name}-native")
        paths[f"{name}>n>b"] = convert_model(paths[f"{name}>n"], BOSON, root / f"{name}-native-boson")
    paths["split>n"] = convert_model(ref / "tiny_split", NATIVE, root / "split-native")
    paths["n>b"] = convert_model(native_tiny, BOSON, root / "native-boson")
    paths["n>b>n"] = convert_model(paths["n>b"], NATIVE, root / "native-boson-native")
    loaded = ["tiny>n>b", "tiny_bf16>n>b", "release_layout>n>b", "n>b"]
    out = root / "loads.json"
    run_in_env(BOSON, [BOSON_SCRIPT, "load", out, ref / "tiny", *(paths[k] for k in loaded)], timeout=300)
    results = json.loads(out.read_text())
    logits = np.load(out.with_suffix(".npz"))
    paths["loads"] = {name: (results[i], logits[str(i)]) for i, name in enumerate(["tiny", *loaded])}
    return paths


def tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    from higgs_ds.models.strict import read_headers

    out = {}
    for name in sorted({h.file for h in read_headers(model_dir).values()}):
        out.update(load_file(model_dir / name))
    return out


def assert_bit_identical(a: dict, b: dict) -> None:
    import torch

    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def native_name(boson_key: str) -> str:
    """The key map as the notes state it (transformers' converter), written out independently of convert.py."""
    key = re.sub(r"^audio_codebook_embeddings\.", "model.embed_audio_tokens.embed_audio_tokens.", boson_key)
    key = re.sub(r"^(embed_tokens|layers|norm)", r"model.\1", key)
    return re.sub(r"^audio_decoder_proj\.", "", key)


def native_text_logits(model_dir: Path):
    import torch

    from higgs_ds.models.native.load import load_native_model

    model = load_native_model(model_dir, dtype="float32").eval()
    with torch.no_grad():
        ids = torch.tensor([TEXT_IDS])
        hidden = model.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return model.text_lm_head(hidden).numpy()


# ------------------------------------------------------------------------ the table against the classes


@pytest.mark.timeout(300)
def test_weight_table_is_the_state_dict_of_both_classes(ref, facts):
    import torch
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    from higgs_ds.models.convert import boson_spec, expected_shapes, native_config

    for name in SHAPE_DIRS:  # tiny, biases on, the released Llama-3.2-3B sizes
        spec = boson_spec(ref / name)
        assert expected_shapes(spec.arch, BOSON) == {k: tuple(v) for k, v in facts["shapes"][name].items()}, name
        with torch.device("meta"):
            model = HiggsAudioV2ForConditionalGeneration(
                HiggsAudioV2Config.from_dict(native_config(spec)), use_text_head=True
            )
        assert expected_shapes(spec.arch, NATIVE) == {k: tuple(v.shape) for k, v in model.state_dict().items()}, name
    release = expected_shapes(boson_spec(ref / "cfg_release").arch, NATIVE)
    audio_embed = release["model.embed_audio_tokens.embed_audio_tokens.weight"]
    assert release["audio_lm_head.weight"] == audio_embed == (8208, 3072)  # 8 x (1024 codes + BOS + EOS)
    assert release["text_lm_head.weight"] == release["model.embed_tokens.weight"] == (128256, 3072)


def test_defaults_for_absent_settings_are_the_classes_defaults(facts):
    from transformers import HiggsAudioV2Config

    from higgs_ds.models.convert import BOSON_DEFAULTS, LLAMA_DEFAULTS, NATIVE_DEFAULT_ROPE, NATIVE_DEFAULTS

    assert BOSON_DEFAULTS == {k: facts["defaults"]["higgs_audio"][k] for k in BOSON_DEFAULTS}
    assert LLAMA_DEFAULTS == {k: facts["defaults"]["llama"][k] for k in LLAMA_DEFAULTS}
    default = HiggsAudioV2Config()
    assert {k: v for k, v in NATIVE_DEFAULTS.items() if k != "rope_parameters"} == {
        k: getattr(default, k) for k in NATIVE_DEFAULTS if k != "rope_parameters"
    }
    assert default.rope_parameters == NATIVE_DEFAULT_ROPE


def test_tie_word_embeddings_ties_nothing_in_either_class(facts):
    """Why convert writes tie_word_embeddings false: boson's true (the release's) ties nothing, and neither
    does native's (the converted config's value cannot change what loads)."""
    import torch
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    assert facts["tie_word_embeddings_ties"] is False
    config = HiggsAudioV2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=8, codebook_size=6,
                                num_codebooks=2, pad_token_id=0, eos_token_id=1, audio_token_id=2,
                                audio_bos_token_id=3, audio_delay_token_id=4, tie_word_embeddings=True)  # fmt: skip
    model = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True)
    assert not torch.equal(model.text_lm_head.weight, model.model.embed_tokens.weight)


def test_rope_inverse_frequencies_are_equal_in_both_classes(ref):
    """boson's LlamaRotaryEmbedding (transformers 4.46) on the boson config, native's on the converted one:
    equal bit for bit (default rope; the release's llama3 low 1 / high 4 / original 8192; the native
    default's llama3 0.125 / 0.5 / 1024, which also equals the release's)."""
    from transformers import HiggsAudioV2Config
    from transformers.models.higgs_audio_v2.modeling_higgs_audio_v2 import HiggsAudioV2RotaryEmbedding

    from higgs_ds.models.convert import boson_spec, native_config

    boson = np.load(ref / "rope.npz")
    for name in ("tiny", "cfg_release", "cfg_native_rope"):
        native = HiggsAudioV2RotaryEmbedding(HiggsAudioV2Config.from_dict(native_config(boson_spec(ref / name))))
        assert np.array_equal(native.inv_freq.numpy(), boson[name]), name
    native_default = HiggsAudioV2RotaryEmbedding(HiggsAudioV2Config()).inv_freq.numpy()
    assert np.array_equal(native_default, boson["cfg_release"])


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["tiny", "tiny_bf16", "release_layout"])
def test_boson_native_boson_is_bit_identical(ref, trips, name):
    original = tensors(ref / name)
    native = tensors(trips[f"{name}>n"])
    assert_bit_identical({native_name(k): v for k, v in original.items()}, native)
    assert_bit_identical(original, tensors(trips[f"{name}>n>b"]))
    if name == "release_layout":  # sharded + index in, sharded + index out, in both directions
        for out in (trips[f"{name}>n"], trips[f"{name}>n>b"]):
            assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) == 3


@pytest.mark.timeout(600)
def test_native_boson_native_is_bit_identical(native_tiny, trips):
    original = tensors(native_tiny)
    boson = tensors(trips["n>b"])
    assert_bit_identical(original, {native_name(k): v for k, v in boson.items()})
    assert_bit_identical(original, tensors(trips["n>b>n"]))


@pytest.mark.timeout(600)
def test_configs_survive_both_round_trips(ref, native_tiny, trips):
    from transformers import HiggsAudioV2Config, PreTrainedTokenizerFast

    from higgs_ds.models.convert import boson_spec, native_spec

    assert boson_spec(ref / "tiny") == boson_spec(trips["tiny>n>b"])
    assert native_spec(native_tiny) == native_spec(trips["n>b>n"])
    # the native config says what the boson one says, read by the native class
    boson = json.loads((ref / "tiny" / "config.json").read_text())
    text = boson["text_config"]
    native = HiggsAudioV2Config.from_pretrained(trips["tiny>n"])
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "hidden_act",
                "bos_token_id", "eos_token_id"):  # fmt: skip
        assert getattr(native, key) == text[key], key
    tokenizer = PreTrainedTokenizerFast.from_pretrained(ref / "tiny")
    assert (native.pad_token_id, native.num_codebooks, native.codebook_size) == (
        boson["pad_token_id"], boson["audio_num_codebooks"], boson["audio_codebook_size"] + 2)  # fmt: skip
    assert (native.audio_token_id, native.audio_bos_token_id) == (
        boson["audio_out_token_idx"], boson["audio_out_bos_token_id"])  # fmt: skip
    assert native.audio_delay_token_id == tokenizer.convert_tokens_to_ids("<|reserved_special_token_6|>")
    assert (native.audio_stream_bos_id, native.audio_stream_eos_id) == (1024, 1025)


# ------------------------------------------------------------------------------ loading the results


@pytest.mark.timeout(600)
def test_converted_native_loads_strictly_and_computes_boson_text_logits(trips):
    from transformers import HiggsAudioV2ForConditionalGeneration

    for key in ("tiny>n", "release_layout>n", "split>n", "n>b>n"):
        _, info = HiggsAudioV2ForConditionalGeneration.from_pretrained(
            trips[key], use_text_head=True, output_loading_info=True
        )
        assert not any(info.values()), (key, info)
    boson_logits = trips["loads"]["tiny"][1]
    diff = np.abs(native_text_logits(trips["tiny>n"]) - boson_logits).max()
    assert diff <= 1e-5, diff  # float32, the same weights in two implementations


@pytest.mark.timeout(600)
def test_converted_boson_loads_strictly_in_boson_environment(native_tiny, trips):
    for name, (result, _) in trips["loads"].items():
        assert result["strict_error"] is None, result
        assert not (result["missing_keys"] or result["unexpected_keys"] or result["mismatched_keys"]), result
    # bit-identical weights in the same class: identical logits; the native model's through boson's class
    assert np.array_equal(trips["loads"]["tiny>n>b"][1], trips["loads"]["tiny"][1])
    diff = np.abs(trips["loads"]["n>b"][1] - native_text_logits(native_tiny)).max()
    assert diff <= 1e-5, diff


@pytest.mark.timeout(300)
def test_converted_tokenizers_tokenize_alike_in_both_environments(native_tiny, trips):
    """The tokenizer of a boson output (native's transformers 5 tokenizer_config rewritten for 4.46) loads in
    the boson environment and tokenizes and decodes as the native tokenizers do here."""
    from transformers import AutoTokenizer

    def here(model_dir):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
        return {"ids": ids, "decoded": tokenizer.decode(ids, skip_special_tokens=True), "bos": tokenizer.bos_token,
                "eos": tokenizer.eos_token, "pad": tokenizer.pad_token, "vocab": len(tokenizer)}  # fmt: skip

    native = here(native_tiny)
    assert native["decoded"] == "user\n\nSay hé!" and len(native["ids"]) > 10
    assert here(trips["tiny>n"]) == here(trips["n>b>n"]) == native
    for name in ("tiny", "tiny>n>b", "n>b"):
        assert trips["loads"][name][0]["tokens"] == native, name


@pytest.mark.timeout(600)
def test_partially_frozen_halves_are_joined(ref, trips):
    """tiny_split holds tiny's weights saved by boson's PartiallyFrozenEmbedding / PartiallyFrozenLinear."""
    split = tensors(ref / "tiny_split")
    assert "embed_tokens.embedding_frozen.weight" in split and "embed_tokens.weight" not in split
    assert "audio_decoder_proj.text_lm_head.linear_trainable.weight" in split
    original = tensors(ref / "tiny")
    assert_bit_identical({native_name(k): v for k, v in original.items()}, tensors(trips["split>n"]))


# ------------------------------------------------------------------------------------------ refusals


def _edit_weights(model_dir: Path, edit) -> None:
    """Apply edit(tensors) -> tensors to a single-file checkpoint, keeping the file name."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})


def _copy(src: Path, tmp_path: Path, name: str = "edited") -> Path:
    return Path(shutil.copytree(src, tmp_path / name))


def _refused(src: Path, to: str, out: Path, *needles: str) -> str:
    from higgs_ds.models.convert import convert_model

    before = sorted(p.name for p in out.parent.iterdir())
    with pytest.raises(UserError) as err:
        convert_model(src, to, out)
    message = str(err.value)
    for needle in needles:
        assert needle in message, message
    assert str(src) in message or str(out) in message, message
    assert sorted(p.name for p in out.parent.iterdir()) == before  # no temp folder, no half a directory left
    return message


def _extra(t):
    import torch

    return {**t, "layers.0.mlp.extra.weight": torch.zeros(3)}


def _misshaped(t):
    import torch

    return {**t, "norm.weight": torch.zeros(65)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "edit, needle",
    [
        (_extra, "unexpected layers.0.mlp.extra.weight"),
        (
            lambda t: {k: v for k, v in t.items() if k != "layers.1.audio_mlp.up_proj.weight"},
            "missing layers.1.audio_mlp.up_proj.weight",
        ),
        (_misshaped, "shape of norm.weight is [65]"),
    ],
    ids=["extra", "missing", "shape"],
)
def test_weights_that_do_not_map_exactly_are_refused(trips, tmp_path, edit, needle):
    edited = _copy(trips["tiny>n>b"], tmp_path)
    _edit_weights(edited, edit)
    _refused(edited, NATIVE, tmp_path / "out", needle)


@pytest.mark.timeout(300)
def test_native_weights_that_do_not_map_are_refused(trips, tmp_path):
    edited = _copy(trips["tiny>n"], tmp_path)
    _edit_weights(edited, lambda t: {k: v for k, v in t.items() if k != "text_lm_head.weight"})
    _refused(edited, BOSON, tmp_path / "out", "missing text_lm_head.weight")


@pytest.mark.timeout(300)
def test_halves_of_different_dtypes_are_refused(ref, tmp_path):
    import torch

    edited = _copy(ref / "tiny_split", tmp_path)
    half = "embed_tokens.embedding_trainable.weight"
    _edit_weights(edited, lambda t: {**t, half: t[half].to(torch.bfloat16)})
    _refused(edited, NATIVE, tmp_path / "out", half, "change a dtype")
    _edit_weights(edited, lambda t: {k: v for k, v in t.items() if k != half})  # one half alone fits nothing
    _refused(edited, NATIVE, tmp_path / "out", "missing embed_tokens.weight", "embed_tokens.embedding_frozen.weight")


def _set(path: str, value):
    def edit(config: dict) -> None:
        *parents, key = path.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[key] = value

    return edit


BOSON_SETTINGS = [  # (edit, what the message must name)
    (_set("audio_decoder_proj_num_layers", 1), "audio_decoder_proj_num_layers"),
    (_set("use_audio_out_embed_projector", True), "use_audio_out_embed_projector"),
    (_set("use_audio_out_self_attention", True), "use_audio_out_self_attention"),
    (_set("encode_whisper_embed", True), "encode_whisper_embed"),
    (_set("skip_audio_tower", False), "skip_audio_tower"),
    (_set("encode_audio_in_tokens", False), "encode_audio_in_tokens"),
    (_set("audio_embed_avg", True), "audio_embed_avg"),
    (_set("use_delay_pattern", False), "use_delay_pattern"),
    (_set("use_rq_transformer", True), "use_rq_transformer"),
    (_set("audio_adapter_type", "stack"), "audio_adapter_type"),
    (_set("audio_dual_ffn_layers", [0]), "audio_dual_ffn_layers"),
    (_set("text_config.rope_scaling", {"rope_type": "linear", "factor": 2.0}), "rope_type 'linear'"),
    (_set("text_config.pretraining_tp", 2), "pretraining_tp"),
    (_set("audio_out_token_idx", 271), "audio_out_token_idx"),
    (_set("audio_eos_token_id", 5), "audio_eos_token_id"),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("edit, needle", BOSON_SETTINGS, ids=[n.split(" ")[0] for _, n in BOSON_SETTINGS])
def test_boson_settings_the_native_class_cannot_express_are_refused(trips, tmp_path, edit, needle):
    edited = _copy(trips["tiny>n>b"], tmp_path)
    config = json.loads((edited / "config.json").read_text())
    edit(config)
    (edited / "config.json").write_text(json.dumps(config))
    _refused(edited, NATIVE, tmp_path / "out", needle)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "key, value", [("audio_delay_token_id", 5), ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4})]
)
def test_native_settings_that_do_not_map_are_refused(trips, tmp_path, key, value):
    edited = _copy(trips["tiny>n"], tmp_path)
    config = json.loads((edited / "config.json").read_text())
    config[key] = value
    (edited / "config.json").write_text(json.dumps(config))
    _refused(edited, BOSON, tmp_path / "out", key if key != "rope_parameters" else "rope_type 'yarn'")


@pytest.mark.timeout(300)
def test_out_folders_and_sources_that_cannot_be_used_are_refused(ref, trips, tmp_path):
    src = trips["tiny>n>b"]
    full = tmp_path / "full"
    full.mkdir()
    (full / "thesis.txt").write_text("years of work")
    _refused(src, NATIVE, full, "not an empty folder")
    assert (full / "thesis.txt").read_text() == "years of work"
    _refused(src, NATIVE, src / "inside", "inside")
    _refused(src, BOSON, tmp_path / "out", "already a boson-format model")
    _refused(src, "onnx", tmp_path / "out", "--to 'onnx'")
    no_tokenizer = _copy(src, tmp_path, "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    _refused(no_tokenizer, NATIVE, tmp_path / "out", "no tokenizer")
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text("{}")
    _refused(adapters, NATIVE, tmp_path / "out", "LoRA adapters", "--merge-lora")


@pytest.mark.timeout(300)
def test_an_empty_out_folder_is_used(trips, tmp_path):
    from higgs_ds.models.convert import convert_model

    (tmp_path / "out").mkdir()
    out = convert_model(trips["tiny>n>b"], NATIVE, tmp_path / "out")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_a_codec_directory_goes_to_the_codec_converter(trips, tmp_path, monkeypatch):
    """Dispatch only: a boson-format codec directory (config.json without model_type + model.pth) is handed
    to higgs_ds.models.convert_codec.convert_codec; a model directory never is."""
    import types

    from higgs_ds.models.convert import convert_model

    calls = []
    module = types.ModuleType("higgs_ds.models.convert_codec")
    module.convert_codec = lambda src, to, out: calls.append((Path(src), to, Path(out))) or Path(out)
    monkeypatch.setitem(sys.modules, "higgs_ds.models.convert_codec", module)
    codec = tmp_path / "codec"
    codec.mkdir()
    (codec / "config.json").write_text(json.dumps({"n_q": 8, "bins": 1024, "sample_rate": 24000}))
    (codec / "model.pth").write_bytes(b"")
    assert convert_model(codec, NATIVE, tmp_path / "out") == tmp_path / "out"
    assert calls == [(codec, NATIVE, tmp_path / "out")]
    convert_model(trips["tiny>n>b"], NATIVE, tmp_path / "model-out")
    assert len(calls) == 1


# ---------------------------------------------------------------------------------- a higgs-ds export


@pytest.mark.timeout(600)
def test_a_boson_export_converts_to_native_and_back(ref, tmp_path):
    """`higgs-ds export`'s boson layout (run in the boson environment from a plain checkpoint of the tiny
    model) converts; codec.json is carried, and back to boson gives the export's tensors."""
    from higgs_ds.models.convert import convert_model

    run = tmp_path / "run"
    ckpt = Path(shutil.copytree(ref / "tiny", run / "checkpoint-1"))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 1, "max_steps": 1, "log_history": []}))
    (run / "higgs_ds_config.json").write_text(json.dumps({"model": "tiny", "output_dir": str(run), "data": {}}))
    exported = tmp_path / "exported"
    run_in_env(BOSON, [BOSON_SCRIPT, "export", run, exported], timeout=300)
    assert (exported / "higgs_ds_export.json").is_file()  # export's own marker: this is its layout
    native = convert_model(exported, NATIVE, tmp_path / "native")
    assert (native / "codec.json").read_bytes() == (exported / "codec.json").read_bytes()
    native_text_logits(native)  # loads strictly
    back = convert_model(native, BOSON, tmp_path / "back")
    assert_bit_identical(tensors(exported), tensors(back))
