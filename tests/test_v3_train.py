"""Higgs TTS 3 through the real trainer: one shard set, built once with a v2 and a v3 tokenizer, trains the native
v2 family and the v3 family; the v3 loss through SWIFT's template equals the notes' formula computed from the
prompts directly; 2 CPU ranks under ZeRO-3 overfit, export in the released layout with the licence files and
reload with equal logits; LoRA keeps the fused table one tensor through training and export."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from higgs_ds.models.v3.checkpoint import FUSED_TABLE
from higgs_ds.stream.loader import DataConfig, ShardStream

from .conftest import torchrun_train, train_env

K, V, BOC = 8, 1026, 1024


@pytest.fixture(scope="module")
def both_shards(tmp_path_factory, small_manifest, tiny_codec, tiny_model_dir, tiny_v3):
    """The small demo set, built ONCE with both families' tokenizers (exact lengths for either)."""
    from higgs_ds.shards.build import BuildConfig, build_shards

    out = tmp_path_factory.mktemp("both-shards")
    cfg = BuildConfig(shard_samples=3, tokenizer=(str(tiny_model_dir), str(tiny_v3)))
    build_shards([str(small_manifest)], str(out), "tiny", cfg, progress=False)
    return out


def _v3_samples(shards, tokenizer):
    stream = ShardStream(DataConfig(shards=[str(shards)], batch_size=4), tokenizer, rank=0, world_size=1, family="v3")
    return sum(list(stream), [])


def _targets_by_hand(sample) -> int:
    """Label cells of a sample's T + 7 delayed rows: every cell but the ramp-in's BOC (0 + 1 + ... + 7 of them)."""
    return K * (sample.out_frames + K - 1) - sum(range(K))


def test_the_template_loss_is_the_formula_from_the_prompts(both_shards, tiny_v3):
    from swift.model import get_model_processor
    from swift.template import get_template

    from higgs_ds.train.swift import register  # noqa: F401

    model, processor = get_model_processor(str(tiny_v3), model_type="higgs_tts_3", torch_dtype="float32")
    template = get_template(processor, template_type="higgs_audio")
    samples = _v3_samples(both_shards, template.tokenizer)[:4]
    batch = template.data_collator(samples)
    loss = template.compute_sft_loss(model, dict(batch))["loss"]
    # by hand: each sample alone, every position's logits; <|audio|> at out_start predicts delayed row 0,
    # the slot holding row j predicts row j + 1; BOC cells are not targets; mean per codebook, then over codebooks
    per_codebook = [[] for _ in range(K)]
    for s in samples:
        ids = torch.from_numpy(s.input_ids)[None]
        audio = ids == -100
        logits = model(ids.masked_fill(audio, 0), None, torch.from_numpy(s.slot_rows), audio).audio_logits[0]
        rows = torch.from_numpy(s.slot_rows[-(s.out_frames + K - 1) :])
        preds = logits[s.out_start : s.out_start + len(rows)]
        for c in range(K):
            keep = rows[:, c] != BOC
            per_codebook[c].append(F.cross_entropy(preds[keep, c], rows[keep, c], reduction="none"))
    by_hand = sum(torch.cat(ce).mean() for ce in per_codebook) / K
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)
    assert int((batch["label_audio_ids"] != -100).sum()) == sum(_targets_by_hand(s) for s in samples)


def test_v3_lengths_of_the_shared_set_are_the_prompts_lengths(both_shards, tiny_v3):
    from transformers import AutoTokenizer

    from higgs_ds.stream.reader import shard_refs

    samples = _v3_samples(both_shards, AutoTokenizer.from_pretrained(str(tiny_v3)))
    lengths = np.concatenate([r.lengths for r in shard_refs([str(both_shards)], lengths_for="v3")])
    assert sorted(lengths.tolist()) == sorted(-(-len(s.input_ids) // 8) * 8 for s in samples)
    v2 = np.concatenate([r.lengths for r in shard_refs([str(both_shards)])])
    assert not np.array_equal(np.sort(v2), np.sort(lengths))  # the two families' positions differ


def _log_history(ckpt):
    return [h for h in json.loads((ckpt / "trainer_state.json").read_text())["log_history"] if "audio_loss" in h]


def _cli(*args, check=True):
    run = subprocess.run([sys.executable, "-m", "higgs_ds.cli", *args], env=_env(), capture_output=True, text=True)
    assert not check or run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return run


def _env():
    return train_env(29600 + os.getpid() % 1000)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_shard_set_trains_v2_and_v3_and_v3_exports_in_the_released_layout(
    tmp_path, both_shards, tiny_model_dir, tiny_v3
):
    from transformers import AutoTokenizer

    port = 29600 + os.getpid() % 1000
    budget = ("--data.max_tokens", "1024", "--data.batch_size", "8")  # budget batching: each family's lengths
    v2 = torchrun_train(tmp_path / "v2", tiny_model_dir, both_shards, "--max_steps", "4", "--save_steps", "4",
                        "--save_probe", "false", *budget, port=port)  # fmt: skip
    assert "[higgs-ds] step 4/4" in v2
    log = torchrun_train(tmp_path / "v3", tiny_v3, both_shards, "--max_steps", "30", "--save_steps", "30",
                         *budget, port=port + 1)  # fmt: skip
    assert "[higgs-ds] step 30/30" in log and "Research and Non-Commercial License" in log
    history = _log_history(tmp_path / "v3" / "checkpoint-30")
    first, last = history[0], history[-1]
    assert last["audio_loss"] < 0.75 * first["audio_loss"], (first, last)  # 8 samples: it overfits
    assert first["text_loss"] == 0  # v3 trains audio only
    samples = _v3_samples(both_shards, AutoTokenizer.from_pretrained(str(tiny_v3)))
    per_epoch = sum(_targets_by_hand(s) for s in samples)
    assert sum(h["target_tokens"] for h in history) % per_epoch == 0  # whole epochs of every sample's cells

    export = tmp_path / "export"
    _cli("export", str(tmp_path / "v3"), "--out", str(export))
    check = _cli("check-export", str(export), "--probe", str(tmp_path / "v3" / "probe.pt"))
    assert json.loads(check.stdout.splitlines()[-1])["equal"]
    assert (export / "config.json").read_bytes() == (tiny_v3 / "config.json").read_bytes()
    assert (export / "LICENSE").read_bytes() == (tiny_v3 / "LICENSE").read_bytes()
    notice, card = (export / "NOTICE").read_text(), (export / "README.md").read_text()
    derived = "Derived from Higgs TTS 3, licensed from Boson AI USA, Inc."
    assert derived in notice and derived in card and "non-commercial" in card
    released, written = load_file(tiny_v3 / "model.safetensors"), load_file(export / "model.safetensors")
    assert set(released) == set(written)
    assert torch.equal(written["tied.head.modality_heads.0.weight"], written[FUSED_TABLE])
    assert not torch.equal(written[FUSED_TABLE], released[FUSED_TABLE])  # trained
    codec = [k for k in released if ".modality_embeddings.0.model." in k]
    assert codec and all(torch.equal(released[k], written[k]) for k in codec)  # the bundled codec, bit for bit


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_v3_lora_under_zero3_keeps_the_table_tied_through_training_and_export(tmp_path, both_shards, tiny_v3):
    port = 29700 + os.getpid() % 1000
    torchrun_train(tmp_path / "lora", tiny_v3, both_shards, "--tuner", "lora", "--max_steps", "6", "--save_steps",
                   "6", "--save_probe", "false", "--data.batch_size", "2", port=port)  # fmt: skip
    ckpt = tmp_path / "lora" / "checkpoint-6"
    adapter = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["modality_embeddings.0.embedding"]
    assert set(adapter["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    export = tmp_path / "export"
    _cli("export", str(ckpt), "--out", str(export), "--merge-lora", "--base", str(tiny_v3))
    released, written = load_file(tiny_v3 / "model.safetensors"), load_file(export / "model.safetensors")
    assert torch.equal(written["tied.head.modality_heads.0.weight"], written[FUSED_TABLE])
    assert not torch.equal(written[FUSED_TABLE], released[FUSED_TABLE])  # the table trained in full
    q = "body.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(written[q], released[q])  # the adapters merged in
    assert "Derived from Higgs TTS 3" in (export / "NOTICE").read_text()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_v3_zero2_with_activation_checkpointing_stops_and_resumes(tmp_path, both_shards, tiny_v3):
    from .conftest import REPO

    port = 29800 + os.getpid() % 1000
    out = tmp_path / "zero2"
    common = ("--deepspeed", str(REPO / "ds_configs" / "zero2.json"), "--activation_checkpointing", "true",
              "--save_steps", "3", "--save_probe", "false", "--data.batch_size", "2")  # fmt: skip
    log = torchrun_train(out, tiny_v3, both_shards, "--max_steps", "3", *common, port=port)
    assert "activation checkpointing: 2 of 2 decoder layers" in log  # read back from the model's layers
    log = torchrun_train(out, tiny_v3, both_shards, "--max_steps", "6", *common, port=port + 1)
    assert "resuming from" in log and "[higgs-ds] step 6/6" in log
    history = _log_history(out / "checkpoint-6")
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]  # the resumed run continued, no step again
    assert history[-1]["audio_loss"] < history[0]["audio_loss"]


def test_preflight_plans_a_v3_run_with_its_lengths_and_lora_sizes(tmp_path, both_shards, tiny_v3, capsys):
    from higgs_ds.errors import UserError
    from higgs_ds.models.v3.checkpoint import load_v3_model
    from higgs_ds.tools.preflight import model_sizes, run

    from .conftest import REPO

    args = [
        "--model",
        str(tiny_v3),
        "--output_dir",
        str(tmp_path / "o"),
        "--data.shards",
        json.dumps([str(both_shards)]),
    ]
    assert run(str(REPO / "configs" / "demo.toml"), args + ["--data.max_tokens", "1024"], nodes=1, gpus_per_node=2) == 0
    assert "preflight: OK" in capsys.readouterr().out
    model = load_v3_model(tiny_v3)
    projections = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    by_hand = sum(8 * (m.in_features + m.out_features) for m in projections) + model.fused.weight.numel()
    assert model_sizes(str(tiny_v3), tuner="lora", lora_rank=8).trainable == by_hand  # adapters + the table
    v2_only = tmp_path / "v2-only"  # the same set without its v3 lengths: budget batching for v3 is refused
    shutil.copytree(both_shards, v2_only)
    index = json.loads((v2_only / "index.json").read_text())
    del index["build"]["v3_tokenizer_fingerprint"]
    (v2_only / "index.json").write_text(json.dumps(index))
    args[-1] = json.dumps([str(v2_only)])
    with pytest.raises(UserError, match="no Higgs TTS 3 lengths"):
        run(str(REPO / "configs" / "demo.toml"), args + ["--data.max_tokens", "1024"], nodes=1, gpus_per_node=2)


def test_v3_tuner_arguments_train_the_table_whole_and_refuse_audio_only_lora():
    from types import SimpleNamespace

    from higgs_ds.errors import UserError
    from higgs_ds.models.patches import is_audio_parameter
    from higgs_ds.train.swift.launch import _tuner_args

    lora = _tuner_args(SimpleNamespace(tuner="lora", train_modules="all", lora_rank=16), "v3")
    assert lora == {
        "lora_rank": 16,
        "target_modules": "all-linear",
        "modules_to_save": ["modality_embeddings.0.embedding"],
    }
    full_audio = _tuner_args(SimpleNamespace(tuner="full", train_modules="audio", lora_rank=16), "v3")
    assert full_audio["freeze_parameters_ratio"] == 1
    assert is_audio_parameter(FUSED_TABLE, "v3") and not is_audio_parameter(
        "tied.embedding.text_embedding.weight", "v3"
    )
    with pytest.raises(UserError, match="no audio-only layers"):
        _tuner_args(SimpleNamespace(tuner="lora", train_modules="audio", lora_rank=16), "v3")
