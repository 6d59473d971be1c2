"""The judges that listen to generated audio: real models in directories the user downloaded once.

Nothing is downloaded (`local_files_only`), no code from a directory runs (higgs_ds.models.trust: no
Python files, no auto_map, transformers' remote-code machinery disabled), weights are safetensors only
(a pickle-only `pytorch_model.bin` is refused), and loading is strict: a missing, unexpected or mis-shaped
weight (as transformers reports it after its own legacy renames) is a UserError naming the directory.

- `AsrJudge` (WER/CER): `WhisperForConditionalGeneration` + `WhisperProcessor`. Seed-TTS-eval's English
  judge is `openai/whisper-large-v3`, whose Hub folder loads as it is. Its `normalizer.json` (Whisper's
  British->American spelling map) is used by `spelling` for text normalisation.
- `SpeakerJudge` (SIM): `WavLMForXVector` + its feature extractor, e.g. `microsoft/wavlm-base-plus-sv`. That
  folder holds only `pytorch_model.bin`: convert it once where you trust it (`WavLMForXVector.from_pretrained(
  ...).save_pretrained(DIR)` writes safetensors). Seed-TTS-eval's SIM uses a different model (UniSpeech's
  WavLM-large + ECAPA-TDNN, not a transformers class), so SIM from this judge ranks your checkpoints but is not
  comparable with published SIM numbers.
- `MosJudge` (naturalness): every public UTMOS checkpoint (UTMOS22's Lightning .ckpt, UTMOSv2, SpeechMOS'
  torch.hub weights) is a pickle with custom code, which higgs-ds does not load. The MOS judge is therefore a
  real transformers SSL encoder (`Wav2Vec2Model`, `WavLMModel` or `HubertModel`: config.json, model.safetensors,
  preprocessor_config.json) plus `MosHead`, the UTMOS22 strong learner's head (data-domain and judge
  embeddings concatenated to every SSL frame, a BLSTM, Linear-ReLU-Linear, mean over frames, x2+3), in
  `mos_head.safetensors` + `mos_head.json`. To reproduce UTMOS22 strong, convert its checkpoint once: the
  fine-tuned fairseq wav2vec 2.0 base -> `Wav2Vec2Model` (transformers' fairseq conversion key map), and
  `domain_emb`, `judge_emb`, `blstm.*`, `projection.*` -> mos_head.safetensors under the same names
  (ssl_dim 768, domain_dim 128, judge_dim 128, rnn_hidden 512, projection_hidden 2048).

Each judge takes a list of mono float waves at one sampling rate, resamples them to its own (soxr, as
higgs_ds.shards.audio), runs in batches on CPU or GPU, and returns Python/numpy results in input order. Waves
shorter than MIN_SECONDS are padded with silence to it (the SSL front ends need a few hundred ms); an x-vector
or MOS of such a clip says little, which the per-sample rows show.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from higgs_ds.errors import UserError

MIN_SECONDS = 0.5
# the feature extractor's settings: the Hub's folders (and transformers 4) write the first, transformers 5's
# processors the second
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
MOS_HEAD_CONFIG = "mos_head.json"
MOS_HEAD_WEIGHTS = "mos_head.safetensors"
MOS_HEAD_FORMAT = "higgs-ds-utmos-head"
MOS_HEAD_SIZES = ("ssl_dim", "domain_dim", "judge_dim", "rnn_hidden", "projection_hidden")
SSL_ENCODERS = {"wav2vec2": "Wav2Vec2Model", "wavlm": "WavLMModel", "hubert": "HubertModel"}
MOS_HEAD_HINT = (
    "the MOS judge is an SSL encoder folder plus higgs-ds's UTMOS-style head (mos_head.json + mos_head.safetensors); "
    "see higgs_ds.eval.judges for what to convert"
)


class JudgeError(UserError):
    """A judge directory that cannot be loaded as that judge."""


# ---------------------------------------------------------------------------------------------- directories


def check_judge_dir(
    path: str | os.PathLike, what: str, required: Sequence[str | tuple[str, ...]], example: str, missing_hint: str = ""
) -> Path:
    """The directory, after refusing anything missing (each entry of `required` is a file name, or a tuple of
    alternatives), any code in it, and weights that are not safetensors. Errors name the path and the fix;
    `example` is a Hub repository that makes a working judge of this kind."""
    from higgs_ds.models.strict import WeightsError, read_headers
    from higgs_ds.models.trust import check_model_dir, forbid_remote_code

    root = Path(os.path.expanduser(os.fspath(path)))
    if not root.is_dir():
        raise JudgeError(
            f"{what} {path} is not a local directory: higgs-ds never downloads a judge; download one once "
            f"(e.g. `hf download {example} --local-dir DIR`) and pass that directory"
            + (f"; {missing_hint}" if missing_hint else "")
        )
    for entry in required:
        names = (entry,) if isinstance(entry, str) else entry
        if not any((root / n).is_file() for n in names):
            raise JudgeError(
                f"{what} {root} has no {' or '.join(names)}: "
                + (missing_hint or f"point at the whole downloaded model folder (e.g. {example}), not a part of it")
            )
    forbid_remote_code()
    check_model_dir(root)
    try:  # safetensors present and readable; a pickle-only folder is refused by name
        read_headers(root)
    except WeightsError as err:
        raise JudgeError(
            f"{what}: {err}. A Hub folder with only pytorch_model.bin: convert it once where you trust the file "
            "(`CLASS.from_pretrained(DIR).save_pretrained(OUT)` writes model.safetensors) and pass OUT"
        ) from None
    return root


def _config(root: Path, what: str, model_types: Sequence[str]):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise JudgeError(f"{what} {root / 'config.json'} is not a transformers config ({err})") from None
    if config.model_type not in model_types:
        raise JudgeError(
            f"{what} {root / 'config.json'} is a {config.model_type!r} model; this judge needs "
            f"{' or '.join(model_types)}"
        )
    return config


def _load_strict(cls, root: Path, what: str, device, dtype):
    """cls.from_pretrained, refused unless the weights are exactly the class's."""
    try:
        model, info = cls.from_pretrained(
            root, local_files_only=True, use_safetensors=True, trust_remote_code=False, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise JudgeError(f"{what} {root}: {cls.__name__} cannot load it ({err})") from None
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(kind) or [])
        if keys:
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(keys[:5])}" + (" ..." if len(keys) > 5 else ""))
    if problems:
        raise JudgeError(
            f"{what} {root}: its weights are not {cls.__name__}'s ({'; '.join(problems)}): the folder is "
            "incomplete or holds another model"
        )
    return model.to(device=device, dtype=dtype).eval()


def _device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---------------------------------------------------------------------------------------------- audio in


def prepare_waves(waves: Sequence[np.ndarray], sr: int, target_sr: int) -> list[np.ndarray]:
    """Mono float32 waves at `target_sr`, at least MIN_SECONDS long (silence appended)."""
    import soxr

    if sr <= 0:
        raise UserError(f"sampling rate {sr}: must be a positive number of samples per second")
    out = []
    for i, wave in enumerate(waves):
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1:
            raise UserError(f"wave {i} has shape {wave.shape}: judges take mono 1-D waves (downmix first)")
        if not np.isfinite(wave).all():
            raise UserError(f"wave {i} has NaN or infinite samples")
        if sr != target_sr and wave.size:
            wave = soxr.resample(wave, sr, target_sr, quality="HQ").astype(np.float32)
        minimum = math.ceil(MIN_SECONDS * target_sr)
        if wave.size < minimum:
            wave = np.pad(wave, (0, minimum - wave.size))
        out.append(wave)
    return out


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _SpeechEncoderInputs:
    """Batched feature-extractor inputs for wav2vec2-style models. With an attention mask (the extractor's
    `return_attention_mask`) waves are padded together; without one (group-norm front ends such as
    wav2vec2-base, which must not see padding) each wave runs alone, so results never depend on the batch."""

    def __init__(self, extractor, device, dtype, batch_size: int):
        self.extractor, self.device, self.dtype, self.batch_size = extractor, device, dtype, batch_size

    def __call__(self, waves: list[np.ndarray]):
        size = self.batch_size if self.extractor.return_attention_mask else 1
        for batch in _batches(waves, size):
            feats = self.extractor(batch, sampling_rate=self.extractor.sampling_rate, return_tensors="pt", padding=True)
            values = feats["input_values"].to(self.device, self.dtype)
            mask = feats.get("attention_mask")
            yield values, (mask.to(self.device) if mask is not None else None)


# ---------------------------------------------------------------------------------------------- ASR


class AsrJudge:
    """Whisper transcripts. `transcribe(waves, sr, language)`; language None lets a multilingual Whisper
    detect it; a str or one per wave ('en', 'zh', ...) forces it."""

    what = "ASR judge"

    def __init__(self, path, device: str | None = "cpu", batch_size: int = 8, dtype=torch.float32):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        root = check_judge_dir(
            path,
            self.what,
            ["config.json", PROCESSOR_FILES, "generation_config.json", ("tokenizer.json", "vocab.json")],
            "openai/whisper-large-v3",
        )
        _config(root, self.what, ["whisper"])
        self.root, self.device, self.dtype, self.batch_size = root, _device(device), dtype, batch_size
        try:
            self.processor = WhisperProcessor.from_pretrained(root, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise JudgeError(f"{self.what} {root}: WhisperProcessor cannot load it ({err})") from None
        self.model = _load_strict(WhisperForConditionalGeneration, root, self.what, self.device, dtype)
        self.sampling_rate = self.processor.feature_extractor.sampling_rate
        self.spelling = self.processor.tokenizer.english_spelling_normalizer or {}
        self.languages = sorted(k.strip("<|>") for k in (self.model.generation_config.lang_to_id or {}))

    def _languages(self, language, n: int) -> list[str] | None:
        from higgs_ds.eval.metrics import base_language

        if language is None or not getattr(self.model.generation_config, "is_multilingual", False):
            return None  # detected, or an English-only Whisper (which takes no language token)
        langs = [language] * n if isinstance(language, str) else list(language)
        if len(langs) != n:
            raise UserError(f"{len(langs)} languages for {n} waves: give one per wave, or one for all")
        langs = [base_language(lang) for lang in langs]
        unknown = sorted(set(langs) - set(self.languages))
        if unknown:
            raise UserError(f"{self.what} {self.root} has no language {', '.join(unknown)} (it has {self.languages})")
        return langs

    def _check_long_form(self, samples: int) -> None:
        """Whisper transcribes past its 30 s window only by predicting timestamps (transformers' long-form)."""
        first = getattr(self.model.generation_config, "no_timestamps_token_id", None)
        stamp = self.processor.tokenizer.convert_tokens_to_ids("<|0.00|>")
        if first is None or stamp != first + 1:
            raise UserError(
                f"a wave of {samples / self.sampling_rate:.1f} s is longer than Whisper's 30 s window, and {self.what} "
                f"{self.root} has no timestamp tokens for long-form transcription: use a released Whisper "
                "(large-v3 has them) or shorter evaluation items"
            )

    @torch.inference_mode()
    def transcribe(
        self, waves: Sequence[np.ndarray], sr: int, language: str | Sequence[str] | None = "en"
    ) -> list[str]:
        waves = prepare_waves(waves, sr, self.sampling_rate)
        langs = self._languages(language, len(waves))
        out = []
        for start in range(0, len(waves), self.batch_size):
            batch = waves[start : start + self.batch_size]
            long_form = max(len(w) for w in batch) > self.processor.feature_extractor.n_samples
            if long_form:
                self._check_long_form(max(len(w) for w in batch))
            feats = self.processor.feature_extractor(
                batch,
                sampling_rate=self.sampling_rate,
                return_tensors="pt",
                return_attention_mask=True,
                **({"truncation": False, "padding": "longest"} if long_form else {}),
            )
            kwargs = {"task": "transcribe", "return_timestamps": long_form or None}
            if langs is not None:
                kwargs["language"] = langs[start : start + len(batch)]
            ids = self.model.generate(
                feats["input_features"].to(self.device, self.dtype),
                attention_mask=feats["attention_mask"].to(self.device),
                **kwargs,
            )
            texts = self.processor.batch_decode(ids, skip_special_tokens=True, decode_with_timestamps=False)
            out += [t.strip() for t in texts]
        return out


# ---------------------------------------------------------------------------------------------- speaker


class SpeakerJudge:
    """Speaker-verification embeddings (WavLMForXVector): `embed(waves, sr) -> (n, d)` float32."""

    what = "speaker judge"

    def __init__(self, path, device: str | None = "cpu", batch_size: int = 8, dtype=torch.float32):
        from transformers import AutoFeatureExtractor, WavLMForXVector

        root = check_judge_dir(path, self.what, ["config.json", PROCESSOR_FILES], "microsoft/wavlm-base-plus-sv")
        _config(root, self.what, ["wavlm"])
        self.root, self.device = root, _device(device)
        self.extractor = _feature_extractor(AutoFeatureExtractor, root, self.what)
        self.model = _load_strict(WavLMForXVector, root, self.what, self.device, dtype)
        self.sampling_rate = self.extractor.sampling_rate
        self.inputs = _SpeechEncoderInputs(self.extractor, self.device, dtype, batch_size)

    @torch.inference_mode()
    def embed(self, waves: Sequence[np.ndarray], sr: int) -> np.ndarray:
        waves = prepare_waves(waves, sr, self.sampling_rate)
        rows = [self.model(values, attention_mask=mask).embeddings.float().cpu() for values, mask in self.inputs(waves)]
        return torch.cat(rows).numpy() if rows else np.zeros((0, self.model.config.xvector_output_dim), np.float32)


def _feature_extractor(cls, root: Path, what: str):
    try:
        extractor = cls.from_pretrained(root, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise JudgeError(f"{what} {root / 'preprocessor_config.json'}: not a feature extractor ({err})") from None
    if type(extractor).__name__ != "Wav2Vec2FeatureExtractor":
        raise JudgeError(
            f"{what} {root / 'preprocessor_config.json'} is a {type(extractor).__name__}; the speech encoder needs "
            "a Wav2Vec2FeatureExtractor (raw 16 kHz waves)"
        )
    return extractor


# ---------------------------------------------------------------------------------------------- MOS


class MosHead(nn.Module):
    """UTMOS22 strong learner's head on SSL frames: [frame; domain_emb; judge_emb] -> BLSTM -> Linear-ReLU-Linear
    per frame -> mean over the wave's frames -> x2+3 (UTMOS trains on MOS scaled to -1..1)."""

    def __init__(self, ssl_dim: int, domain_dim: int, judge_dim: int, rnn_hidden: int, projection_hidden: int):
        super().__init__()
        self.sizes = dict(
            ssl_dim=ssl_dim,
            domain_dim=domain_dim,
            judge_dim=judge_dim,
            rnn_hidden=rnn_hidden,
            projection_hidden=projection_hidden,
        )
        self.domain_emb = nn.Parameter(torch.empty(1, domain_dim), requires_grad=False)
        self.judge_emb = nn.Parameter(torch.empty(1, judge_dim), requires_grad=False)
        self.blstm = nn.LSTM(ssl_dim + domain_dim + judge_dim, rnn_hidden, batch_first=True, bidirectional=True)
        self.projection = nn.Sequential(
            nn.Linear(2 * rnn_hidden, projection_hidden), nn.ReLU(), nn.Linear(projection_hidden, 1)
        )

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """frames (B, T, ssl_dim), lengths (B,) valid frames per wave -> (B,) MOS."""
        b, t, _ = frames.shape
        x = torch.cat([frames, self.domain_emb.expand(b, t, -1), self.judge_emb.expand(b, t, -1)], dim=2)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        y, _ = nn.utils.rnn.pad_packed_sequence(self.blstm(packed)[0], batch_first=True, total_length=t)
        scores = self.projection(y).squeeze(2)
        mask = torch.arange(t, device=frames.device)[None, :] < lengths.to(frames.device)[:, None]
        return (scores * mask).sum(1) / lengths.to(scores) * 2 + 3


def save_mos_head(head: MosHead, out_dir: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(out / MOS_HEAD_WEIGHTS))
    (out / MOS_HEAD_CONFIG).write_text(json.dumps({"format": MOS_HEAD_FORMAT, "version": 1, **head.sizes}) + "\n")


def load_mos_head(root: Path, ssl_dim: int) -> MosHead:
    """mos_head.json + mos_head.safetensors, strictly (keys and shapes exactly MosHead's)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from higgs_ds.models.strict import mismatch_message

    path = root / MOS_HEAD_CONFIG
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise JudgeError(f"MOS judge {path} is not readable JSON ({err})") from None
    expected = {"format", "version", *MOS_HEAD_SIZES}
    if not isinstance(spec, dict) or set(spec) != expected or spec["format"] != MOS_HEAD_FORMAT or spec["version"] != 1:
        raise JudgeError(
            f"MOS judge {path} must be {{'format': '{MOS_HEAD_FORMAT}', 'version': 1, {', '.join(MOS_HEAD_SIZES)}}}"
        )
    if not all(isinstance(spec[k], int) and not isinstance(spec[k], bool) and spec[k] > 0 for k in MOS_HEAD_SIZES):
        raise JudgeError(f"MOS judge {path}: {', '.join(MOS_HEAD_SIZES)} must be positive integers")
    if spec["ssl_dim"] != ssl_dim:
        raise JudgeError(f"MOS judge {path}: ssl_dim {spec['ssl_dim']} but the encoder's hidden size is {ssl_dim}")
    head = MosHead(**{k: spec[k] for k in MOS_HEAD_SIZES})
    try:
        weights = load_file(str(root / MOS_HEAD_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as err:
        raise JudgeError(f"MOS judge {root / MOS_HEAD_WEIGHTS} is not a readable safetensors file ({err})") from None
    problem = mismatch_message(
        {k: tuple(v.shape) for k, v in weights.items()}, {k: tuple(v.shape) for k, v in head.state_dict().items()}
    )
    if problem:
        raise JudgeError(f"MOS judge {root / MOS_HEAD_WEIGHTS}: not MosHead's weights ({problem})")
    head.load_state_dict(weights, strict=True)
    return head


class MosJudge:
    """Predicted MOS (1-5 scale of UTMOS): `score(waves, sr) -> (n,)` float32."""

    what = "MOS judge"

    def __init__(self, path, device: str | None = "cpu", batch_size: int = 8, dtype=torch.float32):
        import transformers
        from transformers import AutoFeatureExtractor

        required = ["config.json", PROCESSOR_FILES, MOS_HEAD_CONFIG, MOS_HEAD_WEIGHTS]
        root = check_judge_dir(path, self.what, required, "facebook/wav2vec2-base", MOS_HEAD_HINT)
        config = _config(root, self.what, list(SSL_ENCODERS))
        self.root, self.device = root, _device(device)
        self.extractor = _feature_extractor(AutoFeatureExtractor, root, self.what)
        cls = getattr(transformers, SSL_ENCODERS[config.model_type])
        self.encoder = _load_strict(cls, root, self.what, self.device, dtype)
        self.head = load_mos_head(root, config.hidden_size).to(self.device, dtype).eval()
        self.sampling_rate = self.extractor.sampling_rate
        self.inputs = _SpeechEncoderInputs(self.extractor, self.device, dtype, batch_size)

    @torch.inference_mode()
    def score(self, waves: Sequence[np.ndarray], sr: int) -> np.ndarray:
        waves = prepare_waves(waves, sr, self.sampling_rate)
        out = []
        for values, mask in self.inputs(waves):
            frames = self.encoder(values, attention_mask=mask).last_hidden_state
            samples = mask.sum(1) if mask is not None else torch.full((len(values),), values.shape[1])
            lengths = self.encoder._get_feat_extract_output_lengths(samples).clamp(1, frames.shape[1])
            out.append(self.head(frames, lengths).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def load_judges(asr=None, speaker=None, mos=None, device: str | None = "cpu", batch_size: int = 8) -> dict:
    """The judges whose directories are given: {"asr": AsrJudge, "speaker": SpeakerJudge, "mos": MosJudge}."""
    kinds = {"asr": (AsrJudge, asr), "speaker": (SpeakerJudge, speaker), "mos": (MosJudge, mos)}
    return {k: cls(path, device=device, batch_size=batch_size) for k, (cls, path) in kinds.items() if path}
