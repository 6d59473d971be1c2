"""Higgs TTS 3 (Higgs Audio v3, `higgs_multimodal_qwen3`): the third model family, trained in the default
environment. Facts: docs/research/higgs-tts-3-facts.md."""
