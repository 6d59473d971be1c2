"""The transformers-native family (HiggsAudioV2ForConditionalGeneration, transformers >= 5.18): its tiny model,
directory layout, strict loading, batch layout with boson's training labels, and the logits for our loss."""
