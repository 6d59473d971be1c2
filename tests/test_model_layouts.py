"""The model directories users have load strictly (issue #11, check 4), and `higgs-ds convert` end to end.

- native, laid out like Boson's current `main` of bosonai/higgs-audio-v2-generation-3B-base: config.json,
  generation_config.json with the repetition-aware-sampling settings, processor_config.json,
  chat_template.jinja, the tokenizer, and the weights as sharded safetensors + model.safetensors.index.json.
  Loaded with higgs_ds.models.native.load.load_native_model.
- boson, laid out like revision 10840182 (config.json, generation_config.json, tokenizer.json,
  tokenizer_config.json, special_tokens_map.json, sharded safetensors + index), built by boson's own
  save_pretrained in the boson environment (tests/reference/boson_model.py) and loaded there with
  HiggsAudioModel.from_pretrained + higgs_ds.models.strict.check_state_dict_matches.

A missing or unexpected weight in either is an error naming it (boson's from_pretrained alone only reports
it and loads on: the strict check is what refuses).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from higgs_ds.errors import UserError
from higgs_ds.models.family import BOSON
from tests.envs import REFERENCE, REPO, run_in_env

pytestmark = pytest.mark.native_env

BOSON_SCRIPT = REFERENCE / "boson_model.py"
INDEX = "model.safetensors.index.json"
NATIVE_MAIN_FILES = ["chat_template.jinja", "config.json", "generation_config.json", "processor_config.json",
                     "tokenizer.json", "tokenizer_config.json", INDEX]  # fmt: skip
BOSON_10840182_FILES = ["config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json",
                        "tokenizer_config.json", INDEX]  # fmt: skip


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("boson-ref") / "ref"
    run_in_env(BOSON, [BOSON_SCRIPT, "build", out], timeout=300)
    return out


@pytest.fixture(scope="module")
def native_main(tmp_path_factory) -> Path:
    """The tiny native model with its weights re-saved as transformers' own sharded checkpoint + index."""
    from transformers import HiggsAudioV2ForConditionalGeneration

    from higgs_ds.models.native.tiny import write_tiny_native_model

    root = tmp_path_factory.mktemp("native-main")
    single = write_tiny_native_model(root / "single", seed=4, codec=None)
    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(single, use_text_head=True)
    model.save_pretrained(root / "sharded", max_shard_size="2MB")
    main = Path(shutil.copytree(single, root / "main", ignore=shutil.ignore_patterns("*.safetensors")))
    for shard in [*(root / "sharded").glob("model-*.safetensors"), root / "sharded" / INDEX]:
        shutil.copy(shard, main / shard.name)
    return main


def _shards(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("model-*.safetensors"))


def _edit_sharded(model_dir: Path, drop: str | None = None, add: str | None = None) -> None:
    """Remove weight `drop` from its shard and the index, or add an unexpected weight `add` to the first
    shard and the index: a consistent checkpoint that is not the model's."""
    import torch
    from safetensors.torch import load_file, save_file

    index = json.loads((model_dir / INDEX).read_text())
    shard = model_dir / (index["weight_map"][drop] if drop else _shards(model_dir)[0].name)
    tensors = load_file(shard)
    if drop:
        del tensors[drop], index["weight_map"][drop]
    if add:
        tensors[add] = torch.zeros(4)
        index["weight_map"][add] = shard.name
    save_file(tensors, shard, metadata={"format": "pt"})
    (model_dir / INDEX).write_text(json.dumps(index))


def _copy(src: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(src, tmp_path / name))


# ---------------------------------------------------------------------------------------------- native


@pytest.mark.timeout(300)
def test_native_directory_laid_out_like_bosons_main_loads_strictly(native_main):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, GenerationConfig

    from higgs_ds.models.native.load import load_native_model

    assert all((native_main / name).is_file() for name in NATIVE_MAIN_FILES)
    assert len(_shards(native_main)) > 1 and not (native_main / "model.safetensors").exists()
    generation = GenerationConfig.from_pretrained(native_main)
    assert (generation.ras_win_len, generation.ras_win_max_num_repeat) == (7, 2)
    processor = json.loads((native_main / "processor_config.json").read_text())
    assert processor["processor_class"] == "HiggsAudioV2Processor"
    tokenizer = AutoTokenizer.from_pretrained(native_main)  # reads chat_template.jinja
    messages = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>")
    model = load_native_model(native_main)
    state = model.state_dict()
    on_disk = {k: v for shard in _shards(native_main) for k, v in load_file(shard).items()}
    assert sorted(on_disk) == sorted(state)
    assert all(torch.equal(state[k], v) for k, v in on_disk.items())


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "edit, needle",
    [({"drop": "model.layers.1.audio_mlp.down_proj.weight"}, "model.layers.1.audio_mlp.down_proj.weight"),
     ({"drop": "text_lm_head.weight"}, "text_lm_head.weight"),
     ({"add": "model.layers.0.audio_attn.q_proj.weight"}, "model.layers.0.audio_attn.q_proj.weight")],
    ids=["missing", "missing-text-head", "unexpected"],
)  # fmt: skip
def test_native_directory_with_a_missing_or_unexpected_weight_is_refused(native_main, tmp_path, edit, needle):
    from higgs_ds.models.native.load import load_native_model

    edited = _copy(native_main, tmp_path, "edited")
    _edit_sharded(edited, **edit)
    with pytest.raises(UserError) as err:
        load_native_model(edited)
    assert needle in str(err.value) and str(edited) in str(err.value)


@pytest.mark.timeout(120)
def test_an_index_that_disagrees_with_its_shards_is_refused(native_main, tmp_path):
    from higgs_ds.models.strict import read_headers

    edited = _copy(native_main, tmp_path, "edited")
    index = json.loads((edited / INDEX).read_text())
    key = "model.norm.weight"
    others = [s.name for s in _shards(edited) if s.name != index["weight_map"][key]]
    index["weight_map"][key] = others[0]  # listed in a shard that does not hold it
    (edited / INDEX).write_text(json.dumps(index))
    with pytest.raises(UserError, match=f"{key} is listed in {others[0]}"):
        read_headers(edited)
    index["weight_map"][key] = "../elsewhere.safetensors"
    (edited / INDEX).write_text(json.dumps(index))
    with pytest.raises(UserError, match="beside it"):
        read_headers(edited)
    _shards(edited)[-1].unlink()
    (edited / INDEX).write_text(json.dumps(json.loads((native_main / INDEX).read_text())))
    with pytest.raises(UserError, match="which is not in"):
        read_headers(edited)


# ----------------------------------------------------------------------------------------------- boson


@pytest.mark.timeout(600)
def test_boson_directory_laid_out_like_revision_10840182_loads_strictly(ref, tmp_path):
    release = ref / "release_layout"
    assert sorted(p.name for p in release.iterdir() if not p.name.startswith("model-")) == sorted(BOSON_10840182_FILES)
    assert len(_shards(release)) == 3
    missing = _copy(release, tmp_path, "missing")
    _edit_sharded(missing, drop="layers.0.audio_mlp.gate_proj.weight")
    unexpected = _copy(release, tmp_path, "unexpected")
    _edit_sharded(unexpected, add="layers.0.audio_attn.q_proj.weight")
    out = tmp_path / "loads.json"
    run_in_env(BOSON, [BOSON_SCRIPT, "load", out, release, missing, unexpected], timeout=300)
    whole, dropped, added = json.loads(out.read_text())
    assert whole["strict_error"] is None and not (whole["missing_keys"] or whole["unexpected_keys"]), whole
    for result, key, kind in ((dropped, "layers.0.audio_mlp.gate_proj.weight", "missing"),
                              (added, "layers.0.audio_attn.q_proj.weight", "unexpected")):  # fmt: skip
        assert f"{kind} {key}" in result["strict_error"] and str(tmp_path) in result["strict_error"], result
        assert key in result[f"{kind}_keys"], result  # boson's from_pretrained saw it and loaded anyway


# ---------------------------------------------------------------------------------------------- the CLI


def _cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "higgs_ds.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=240, cwd=REPO)  # fmt: skip


@pytest.mark.timeout(900)
def test_higgs_ds_convert_end_to_end(ref, tmp_path):
    from higgs_ds.models.native.load import load_native_model

    native, boson = tmp_path / "native", tmp_path / "boson"
    done = _cli("convert", ref / "release_layout", "--to", "native", "--out", native)
    assert done.returncode == 0, done.stderr
    assert f"-> {native} (native format)" in done.stdout
    load_native_model(native)
    assert (native / INDEX).is_file() and (native / "processor_config.json").is_file()

    again = _cli("convert", ref / "release_layout", "--to", "native", "--out", native)
    assert again.returncode == 2 and again.stdout == ""
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("higgs-ds: error: ") and str(native) in lines[0], again.stderr
    load_native_model(native)  # the refused run left the first one as it was

    bad = _copy(ref / "release_layout", tmp_path, "projector")
    config = json.loads((bad / "config.json").read_text())
    config["use_audio_out_embed_projector"] = True
    (bad / "config.json").write_text(json.dumps(config))
    refused = _cli("convert", bad, "--to", "native", "--out", tmp_path / "never")
    assert refused.returncode == 2 and "use_audio_out_embed_projector" in refused.stderr, refused.stderr
    assert not (tmp_path / "never").exists()
    assert _cli("convert", native, "--to", "onnx", "--out", tmp_path / "never").returncode == 2

    back = _cli("convert", native, "--to", "boson", "--out", boson)
    assert back.returncode == 0, back.stderr
    out = tmp_path / "loads.json"
    run_in_env(BOSON, [BOSON_SCRIPT, "load", out, boson], timeout=300)
    (result,) = json.loads(out.read_text())
    assert result["strict_error"] is None and not (result["missing_keys"] or result["unexpected_keys"]), result
