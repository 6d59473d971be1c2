"""Stage: the tiny real Higgs-Audio model and tokenizer, loaded the way a released checkpoint is."""

import pytest
import torch

# boson's tiny model in boson's environment; the native family's below (and in test_native_batch.py)


@pytest.mark.boson_env
def test_tiny_model_loads_through_from_pretrained(tiny_model_dir):
    import boson_multimodal.model.higgs_audio  # noqa: F401
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert isinstance(config, HiggsAudioConfig)
    model = AutoModel.from_pretrained(tiny_model_dir)
    assert type(model) is HiggsAudioModel
    # the released layout: dual FFN on every layer, 8 codebooks of 1024 (+BOS/EOS), delay pattern, no Whisper tower
    assert config.audio_adapter_type.startswith("dual_ffn") and config.audio_dual_ffn_layers == [0, 1]
    assert config.audio_num_codebooks == 8 and config.audio_codebook_size == 1024
    assert config.use_delay_pattern and config.encode_audio_in_tokens and not config.encode_whisper_embed
    assert model.audio_codebook_embeddings.weight.shape[0] == 8 * 1026
    assert all(hasattr(layer, "audio_mlp") for layer in model.layers)

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = {
        name: tok.convert_tokens_to_ids(name)
        for name in ("<|AUDIO|>", "<|AUDIO_OUT|>", "<|audio_out_bos|>", "<|audio_eos|>", "<|end_of_text|>")
    }
    assert ids["<|AUDIO|>"] == config.audio_in_token_idx
    assert ids["<|AUDIO_OUT|>"] == config.audio_out_token_idx
    assert ids["<|audio_out_bos|>"] == config.audio_out_bos_token_id
    assert ids["<|audio_eos|>"] == config.audio_eos_token_id
    assert ids["<|end_of_text|>"] == config.pad_token_id == tok.pad_token_id
    assert max(ids.values()) < config.text_config.vocab_size


@pytest.mark.boson_env
def test_prepare_chatml_sample_uses_llama3_headers_and_special_tokens(tiny_model_dir):
    from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    sample = {
        "messages": [
            {"role": "user", "content": "Hi there."},
            {"role": "assistant", "content": {"type": "audio", "audio_url": "x.wav"}},
        ]
    }
    input_ids, labels, audios, _ = prepare_chatml_sample(sample, tok)
    text = tok.decode(input_ids)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|><|eot_id|>"
    )
    assert len(audios) == 1
    trained = tok.decode([i for i, label in zip(input_ids, labels) if label != -100])
    assert trained == "<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|><|eot_id|>"


@pytest.mark.boson_env
def test_tiny_model_is_seeded(tmp_path):
    from safetensors.torch import load_file

    from higgs_ds.models.tiny import write_tiny_model

    a = load_file(write_tiny_model(tmp_path / "a", seed=1) / "model.safetensors")
    b = load_file(write_tiny_model(tmp_path / "b", seed=1) / "model.safetensors")
    c = load_file(write_tiny_model(tmp_path / "c", seed=2) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["audio_codebook_embeddings.weight"], c["audio_codebook_embeddings.weight"])


@pytest.mark.boson_env
def test_released_shape_config_has_the_released_parameter_count():
    import boson_multimodal.model.higgs_audio  # noqa: F401
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from higgs_ds.models.tiny import RELEASED_TEXT, build_tiny_tokenizer, model_config

    with torch.device("meta"):
        model = HiggsAudioModel(model_config(build_tiny_tokenizer(), RELEASED_TEXT))
    assert sum(p.numel() for p in model.parameters()) == 5_771_283_456  # bosonai/higgs-audio-v2-generation-3B-base


@pytest.mark.native_env
def test_native_tiny_model_is_seeded_and_the_released_shape_has_the_released_parameter_count(tmp_path):
    from safetensors.torch import load_file
    from transformers import HiggsAudioV2ForConditionalGeneration

    from higgs_ds.models.native.tiny import native_config, write_tiny_native_model
    from higgs_ds.models.tiny import RELEASED_TEXT, build_tiny_tokenizer

    a = load_file(write_tiny_native_model(tmp_path / "a", seed=1) / "model.safetensors")
    b = load_file(write_tiny_native_model(tmp_path / "b", seed=1) / "model.safetensors")
    c = load_file(write_tiny_native_model(tmp_path / "c", seed=2) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    key = "model.embed_audio_tokens.embed_audio_tokens.weight"
    assert not torch.equal(a[key], c[key])
    with torch.device("meta"):
        model = HiggsAudioV2ForConditionalGeneration(
            native_config(build_tiny_tokenizer(), RELEASED_TEXT), use_text_head=True
        )
    # the parameter count of bosonai/higgs-audio-v2-generation-3B-base (boson's class, the same weights)
    assert sum(p.numel() for p in model.parameters()) == 5_771_283_456
