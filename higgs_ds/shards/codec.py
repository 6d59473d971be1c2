"""Stage 3 of the data flow: waveform (24 kHz mono) -> Higgs-Audio v2 codec codes, uint16 (8, T).

Two formats of the same codec exist (higgs_ds.models.family), one per environment:

- native (the default environment): transformers' `HiggsAudioV2TokenizerModel`, a directory as Boson's
  `main` of bosonai/higgs-audio-v2-tokenizer holds: `config.json` (model_type "higgs_audio_v2_tokenizer",
  the HuBERT teacher in `semantic_model_config`), `model.safetensors`, `preprocessor_config.json`. Loaded
  with the concrete class (no remote code), strictly: the safetensors headers are compared with the class
  built from config.json first, and a missing, unexpected or mis-shaped weight is a CodecError naming it.
- boson (the boson environment): boson_multimodal's `HiggsAudioTokenizer`, `config.json` (its constructor
  arguments) + `model.pth` (its state dict, torch.load(weights_only=True)). The released constructor
  downloads its HuBERT teacher; here the teacher is built from a local config (`semantic_teacher/config.json`,
  else HubertConfig's defaults, HuBERT-base) and its weights come from `model.pth`. Strict too (upstream
  passes strict=False and ignores missing keys).

A directory of the other format is a one-line CodecError saying how to convert it
(higgs_ds.models.convert_codec, `higgs-ds convert DIR --to native|boson --out OUT`).

Both compute boson's `_xcodec_encode`, the encoding the released Higgs-Audio v2 was trained on: the native
path runs it on the native class's modules rather than calling `HiggsAudioV2TokenizerModel.encode`, which
re-pads the acoustic branch by hop / 2 = 480 samples a side where boson pads 160 x 2 = 320 and trims. Both
re-pad when the two branches come out of different lengths, i.e. for clips of 960 k + r samples with r about
119-631 (about half of all lengths); there transformers' codes differ from boson's (measured on the demo
corpus and the tiny codec: 24 of 464, 32 of 400 and 52 of 256 codes). tests/test_codec_convert.py checks that
the native codes equal boson's own on the same weights and audio, and equal
`HiggsAudioV2TokenizerModel.encode` where it does not re-pad.

    codec = load_codec("/path/to/higgs-audio-v2-tokenizer")   # or resolve_codec("tiny")
    codes = codec.encode(wave_24k)                            # np.uint16 (8, ceil(n / 960))
    wave = codec.decode(codes)                                # np.float32 (T * 960,)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from higgs_ds.errors import UserError
from higgs_ds.models.family import BOSON, NATIVE, FamilyError, environment_family, require_codec_family
from higgs_ds.models.tiny import CODEBOOK_SIZE, CODEC_RATIOS, CODEC_SAMPLE_RATE, NUM_CODEBOOKS

# The released codec's config.json in boson's format (bosonai/higgs-audio-v2-tokenizer, revision 9d4988fb).
RELEASED_CODEC_CONFIG = {
    "n_filters": 32,
    "D": 256,
    "codebook_dim": 64,
    "target_bandwidths": [0.5, 1, 1.5, 2, 4],
    "ratios": CODEC_RATIOS,
    "sample_rate": CODEC_SAMPLE_RATE,
    "bins": CODEBOOK_SIZE,
    "n_q": NUM_CODEBOOKS,
    "semantic_techer": "hubert_base_general",
}
# The tiny codec keeps the released geometry (so its codes have the released shape and rate) and only
# makes the HuBERT teacher shallow, which is where the CPU time would otherwise go.
TINY_TEACHER_CONFIG = {"num_hidden_layers": 2, "intermediate_size": 1024}
TINY_CODEC_VERSIONS = {BOSON: "tiny-codec-v2", NATIVE: "tiny-codec-native-v1"}
TINY_CODEC_VERSION = TINY_CODEC_VERSIONS[BOSON]
WEIGHTS = {NATIVE: "model.safetensors", BOSON: "model.pth"}
NATIVE_CLASS = "HiggsAudioV2TokenizerModel"
MARKER = "higgs_ds_codec.json"
SEMANTIC_PAD = 160  # boson pads the acoustic branch by 160 x semantic_downsample_factor samples a side


class CodecError(UserError):
    """A codec directory that cannot be used; the message says what is wrong and how to fix it."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Codec:
    """A loaded codec plus the provenance written into every shard index built with it."""

    model: object
    path: str
    provenance: dict
    family: str = BOSON

    @property
    def hop_length(self) -> int:
        return int(self.provenance["hop_length"])

    def expected_frames(self, num_samples: int) -> int:
        """ceil(n / hop); the codec's real frame count can be one less (it trims its acoustic and
        semantic branches to the shorter one), so shards store the real T."""
        return -(-num_samples // self.hop_length)

    def encode(self, wave: np.ndarray) -> np.ndarray:
        """One 24 kHz mono float waveform -> uint16 codes (num_codebooks, ceil(len / hop))."""
        return self.encode_batch(wave[None])[0]

    def encode_batch(self, waves: np.ndarray) -> np.ndarray:
        """(B, N) waveforms of exactly equal length -> (B, num_codebooks, T). Neither class has a padding
        mask: zero-padding clips of different lengths into one batch would change their codes, so callers
        group by length."""
        import torch

        assert waves.ndim == 2, waves.shape
        x = torch.from_numpy(np.ascontiguousarray(waves, dtype=np.float32)).unsqueeze(1).to(self.model.device)
        with torch.inference_mode():
            if self.family == NATIVE:
                codes = _native_xcodec_encode(self.model, x)
            elif len(x) == 1:
                codes = self.model._xcodec_encode(x).audio_codes  # (1, n_q, T): the upstream path itself
            else:
                codes = _xcodec_encode_batched(self.model, x)
        codes = codes.cpu().numpy()
        assert codes.max(initial=0) < self.provenance["codebook_size"], "codec produced an out-of-range code"
        return codes.astype(np.uint16)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes (num_codebooks, T) -> float32 mono waveform (T * hop,) at the codec's sample rate, through
        the class's own decode (quantizer lookup, fc_post2 / fc2, the DAC decoder)."""
        import torch

        ids = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int64))[None].to(self.model.device)
        with torch.inference_mode():
            if self.family == NATIVE:
                wave = self.model.decode(ids, return_dict=False).cpu().numpy()
            else:
                wave = self.model.decode(ids)  # boson's returns numpy (1, 1, n)
        return np.asarray(wave[0, 0], dtype=np.float32)


def _native_xcodec_encode(model, x):
    """boson's HiggsAudioTokenizer._xcodec_encode on HiggsAudioV2TokenizerModel's modules, batch axis kept.
    The semantic features are the class's own (boson's get_regress_target: 16 kHz, 160 samples of padding,
    mean of HuBERT's hidden states, every second frame); where the acoustic branch comes out another length,
    boson re-encodes it padded by 160 x semantic_downsample_factor samples a side and trims both branches to
    the shorter, which HiggsAudioV2TokenizerModel.encode does not (it pads hop / 2)."""
    return model.quantizer.encode(_native_latents(model, x)).transpose(0, 1)  # (n_q, B, T) -> (B, n_q, T)


def _native_latents(model, x):
    """(B, 1, N) waveforms -> (B, hidden, T): what the native quantizer quantizes, computed as boson does."""
    import torch
    import torch.nn.functional as F

    semantic = model.encoder_semantic(model._extract_semantic_features(x).transpose(1, 2))
    acoustic = model.acoustic_encoder(x)
    if acoustic.shape[2] != semantic.shape[2]:
        pad = SEMANTIC_PAD * model.config.semantic_downsample_factor
        acoustic = model.acoustic_encoder(F.pad(x, (pad, pad)))
    frames = min(acoustic.shape[2], semantic.shape[2])
    e = torch.cat([acoustic[:, :, :frames], semantic[:, :, :frames]], dim=1)
    return model.fc(e.transpose(1, 2)).transpose(1, 2)


def _xcodec_encode_batched(model, x):
    """HiggsAudioTokenizer._xcodec_encode for B > 1. Upstream re-pads with `x[:, 0, :] ... .unsqueeze(0)`,
    which only works for B == 1; this is the same computation with the batch axis kept (tests check it
    against upstream batch-1 codes)."""
    import torch
    import torch.nn.functional as F

    e_semantic = model.encoder_semantic(model.get_regress_target(x).detach().transpose(1, 2))
    e_acoustic = model.encoder(x)
    if e_acoustic.shape[2] != e_semantic.shape[2]:
        pad = SEMANTIC_PAD * model.semantic_downsample_factor
        e_acoustic = model.encoder(F.pad(x[:, 0, :], (pad, pad)).unsqueeze(1))
    frames = min(e_acoustic.shape[2], e_semantic.shape[2])
    e = torch.cat([e_acoustic[:, :, :frames], e_semantic[:, :, :frames]], dim=1)
    e = model.fc_prior(e.transpose(1, 2)).transpose(1, 2)
    _, codes, _, _ = model.quantizer(e, model.frame_rate, None)
    return codes.permute(1, 0, 2)


# ------------------------------------------------------------------------------------------ loading


def load_codec(path: str | os.PathLike, device: str = "cpu") -> Codec:
    """Load a codec directory of this environment's format strictly (see module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise CodecError(
            f"codec directory {path} does not exist (pass the folder of the released "
            "bosonai/higgs-audio-v2-tokenizer, or 'tiny' for the test codec)"
        )
    if not (path / "config.json").is_file():
        raise CodecError(
            f"codec directory {path} has no config.json; expected config.json and model.safetensors (native, "
            "bosonai/higgs-audio-v2-tokenizer main) or config.json and model.pth (boson, revision 9d4988fb); "
            "download it once, or use --codec tiny for a test codec"
        )
    family = _family(path)
    if not (path / WEIGHTS[family]).is_file():
        raise CodecError(
            f"codec directory {path} has no {WEIGHTS[family]}: a {family}-format codec holds config.json and "
            f"{WEIGHTS[family]} (download it again, or use --codec tiny for a test codec)"
        )
    return (_load_native if family == NATIVE else _load_boson)(path, device)


def _family(path: Path) -> str:
    """This environment's format, or a CodecError saying how to convert a directory of the other one."""
    try:
        return require_codec_family(path)
    except FamilyError as err:
        if not (path / WEIGHTS[NATIVE]).is_file() and not (path / WEIGHTS[BOSON]).is_file():
            raise CodecError(
                f"codec directory {path} has no model.safetensors or model.pth: expected config.json and "
                "model.safetensors (native) or config.json and model.pth (boson) as in "
                "bosonai/higgs-audio-v2-tokenizer (download it once, or use --codec tiny for a test codec)"
            ) from None
        raise CodecError(str(err)) from None


def _check_geometry(path: Path, codebooks: int, sample_rate: int, frame_rate: float) -> None:
    if (codebooks, sample_rate, frame_rate) != (NUM_CODEBOOKS, CODEC_SAMPLE_RATE, 25):
        raise CodecError(
            f"codec at {path} has {codebooks} codebooks at {sample_rate} Hz, {frame_rate} frames/s; Higgs-Audio "
            f"v2 needs {NUM_CODEBOOKS} at {CODEC_SAMPLE_RATE} Hz, 25 frames/s (the released tokenizer's geometry)"
        )


def _provenance(path: Path, family: str, rates: dict) -> dict:
    return {
        "codec": _codec_name(path),
        "codec_path": str(path.resolve()),
        "format": family,
        "weights_sha256": sha256_file(path / WEIGHTS[family]),
        **rates,
    }


def _codec_name(path: Path) -> str:
    marker = path / MARKER
    return json.loads(marker.read_text())["name"] if marker.is_file() else "higgs-audio-v2-tokenizer"


@contextlib.contextmanager
def _no_progress_bars():
    """transformers 5 draws a bar per load and save; the shard builder loads a codec in every worker."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def native_expected_shapes(config) -> dict[str, tuple]:
    """The weights HiggsAudioV2TokenizerModel(config) holds, built on the meta device (no memory, no init)."""
    import torch
    from transformers import HiggsAudioV2TokenizerModel

    with torch.device("meta"):
        model = HiggsAudioV2TokenizerModel(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _check_native_weights(path: Path, config) -> None:
    """Refuse weights that are not exactly the class's (safetensors headers only, before any loading):
    from_pretrained would initialise a missing one at random and drop an unexpected one."""
    from higgs_ds.models.strict import WeightsError, mismatch_message, read_headers

    try:
        headers = read_headers(path)
    except WeightsError as err:
        raise CodecError(str(err)) from None
    problem = mismatch_message({k: h.shape for k, h in headers.items()}, native_expected_shapes(config))
    if problem:
        raise CodecError(
            f"codec weights {path / WEIGHTS[NATIVE]} do not match the {NATIVE_CLASS} built from "
            f"{path / 'config.json'}: {problem}. Download the codec again, or convert a boson-format one with "
            "`higgs-ds convert DIR --to native --out OUT`"
        )


@contextlib.contextmanager
def outside_zero3():
    """Inside a ZeRO-3 training process transformers builds every model partitioned (deepspeed.zero.Init) while
    the trainer's DeepSpeed config is registered; the codec (validation audio) is a small frozen model each rank
    holds whole, and its HuBERT init fails partitioned. Unregister the config while the codec is built (and
    the judges, higgs_ds.eval.validation: whole models on rank 0 alone)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _load_native(path: Path, device: str) -> Codec:
    with outside_zero3():
        return _load_native_whole(path, device)


def _load_native_whole(path: Path, device: str) -> Codec:
    import torch
    from transformers import HiggsAudioV2TokenizerConfig, HiggsAudioV2TokenizerModel

    from higgs_ds.models.trust import check_model_dir

    check_model_dir(path)  # data only: no Python files, no auto_map
    try:
        config = HiggsAudioV2TokenizerConfig.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CodecError(f"{path / 'config.json'}: not a HiggsAudioV2TokenizerConfig ({err})") from None
    _check_geometry(path, config.num_quantizers, config.sample_rate, config.frame_rate)
    _check_native_weights(path, config)
    with _no_progress_bars():
        model, info = HiggsAudioV2TokenizerModel.from_pretrained(
            str(path), dtype=torch.float32, output_loading_info=True
        )
    left = {kind: keys for kind, keys in info.items() if kind != "error_msgs" and keys}
    if left:  # the header check above makes this unreachable unless from_pretrained renames keys
        raise CodecError(f"codec weights {path / WEIGHTS[NATIVE]} did not load exactly: {left}")
    model.to(device).eval()
    empty = [name for name, buf in model.named_buffers() if name.endswith("codebook.embed") and not buf.any()]
    if empty:
        raise CodecError(
            f"codec weights {path / WEIGHTS[NATIVE]} hold all-zero codebooks ({empty[:2]}...): an untrained "
            "codec, every frame would get code 0; use a trained codec checkpoint"
        )
    rates = {
        "sample_rate": int(config.sample_rate),
        "hop_length": int(config.hop_length),
        "frame_rate": int(config.frame_rate),
        "num_codebooks": int(config.num_quantizers),
        "codebook_size": int(config.codebook_size),
    }
    return Codec(model=model, path=str(path), provenance=_provenance(path, NATIVE, rates), family=NATIVE)


@contextlib.contextmanager
def _local_semantic_teacher(teacher_config: dict):
    """Make HiggsAudioTokenizer build its teacher from a local config instead of downloading it.

    The class looks up `AutoModel` in its own module at construction time; we swap that name for the
    duration of the constructor only (no file of the installed package is touched)."""
    from boson_multimodal.audio_processing import higgs_audio_tokenizer as hat
    from transformers import HubertConfig, HubertModel

    class _LocalTeacher:
        @staticmethod
        def from_pretrained(*_args, **_kwargs):
            return HubertModel(HubertConfig(**teacher_config))

    original = hat.AutoModel
    hat.AutoModel = _LocalTeacher
    try:
        yield hat.HiggsAudioTokenizer
    finally:
        hat.AutoModel = original


def _construct(config: dict, teacher_config: dict, device: str):
    with _local_semantic_teacher(teacher_config) as cls:
        return cls(**config, device=device)


def _load_boson(path: Path, device: str) -> Codec:
    import torch

    config_path, weights_path = path / "config.json", path / WEIGHTS[BOSON]
    config = json.loads(config_path.read_text())
    teacher_path = path / "semantic_teacher" / "config.json"
    teacher_config = json.loads(teacher_path.read_text()) if teacher_path.is_file() else {}
    torch.manual_seed(0)  # weights are all overwritten below; this only makes construction repeatable
    model = _construct(config, teacher_config, device)
    state = torch.load(weights_path, map_location=device, weights_only=True)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CodecError(
            f"codec weights {weights_path} do not match the codec built from {config_path}: "
            f"{len(result.missing_keys)} missing keys (first: {result.missing_keys[:5]}), "
            f"{len(result.unexpected_keys)} unexpected keys (first: {result.unexpected_keys[:5]}). "
            "If the missing keys start with 'semantic_model.', put the HuBERT teacher's config in "
            f"{path / 'semantic_teacher' / 'config.json'} to match the checkpoint."
        )
    model.to(device).eval()
    if _uninitialised_codebooks(model):
        raise CodecError(
            f"codec weights {weights_path} hold uninitialised codebooks "
            f"({_uninitialised_codebooks(model)[:2]}...): codes would depend on the first clip encoded; "
            "use a trained codec checkpoint"
        )
    _check_geometry(path, model.n_q, model.sample_rate, model.frame_rate)
    rates = {
        "sample_rate": int(model.sample_rate),
        "hop_length": int(model.hop_length),
        "frame_rate": int(model.frame_rate),
        "num_codebooks": int(model.n_q),
        "codebook_size": int(config.get("bins", CODEBOOK_SIZE)),
    }
    return Codec(model=model, path=str(path), provenance=_provenance(path, BOSON, rates), family=BOSON)


def _uninitialised_codebooks(model) -> list[str]:
    return [name for name, buf in model.named_buffers() if name.endswith("inited") and not bool(buf.all())]


# ------------------------------------------------------------------------------------------ the tiny codec


def write_tiny_codec(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a random-weight codec directory of this environment's format, in the released layout and
    geometry (8 x 1024 codes, 25 frames/s of 24 kHz), with a 2-layer HuBERT teacher. Nothing is downloaded."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (_write_tiny_native if environment_family() == NATIVE else _write_tiny_boson)(out, seed)
    (out / MARKER).write_text(json.dumps({"name": TINY_CODEC_VERSIONS[environment_family()], "seed": seed}))
    return out


def _fitting_signal():
    """4 s of a chirp in noise (torch's seeded generator): what the tiny codebooks are fitted to."""
    import torch

    t = torch.arange(4 * CODEC_SAMPLE_RATE) / CODEC_SAMPLE_RATE
    return 0.3 * torch.sin(2 * torch.pi * (120 + 400 * t) * t) + 0.05 * torch.randn(len(t))


def _write_tiny_boson(out: Path, seed: int) -> None:
    """boson's RVQ codebooks are built with kmeans_init: untrained, they hold zeros and are fitted to the
    first batch ever encoded, so codes would depend on which clip came first. Here they are fitted once,
    at build time, to a fixed seeded signal, and saved as initialised like the released checkpoint's."""
    import torch

    torch.manual_seed(seed)
    model = _construct(RELEASED_CODEC_CONFIG, TINY_TEACHER_CONFIG, "cpu").eval()
    with torch.inference_mode():
        model._xcodec_encode(_fitting_signal().view(1, 1, -1))
    assert _uninitialised_codebooks(model) == []
    torch.save(model.state_dict(), out / WEIGHTS[BOSON])
    (out / "config.json").write_text(json.dumps(RELEASED_CODEC_CONFIG, indent=1))
    (out / "semantic_teacher").mkdir(exist_ok=True)
    (out / "semantic_teacher" / "config.json").write_text(json.dumps(TINY_TEACHER_CONFIG, indent=1))


def _write_tiny_native(out: Path, seed: int) -> None:
    """The released native config (the boson release's converted, the teacher 2 layers deep; mask_time_prob
    0 as native's default, so no SpecAugment embedding), random seeded weights, codebooks fitted as boson's
    are: the class initialises them to zeros (every code 0)."""
    import torch
    from transformers import HiggsAudioV2TokenizerConfig, HiggsAudioV2TokenizerModel

    from higgs_ds.models.convert_codec import FEATURE_EXTRACTOR, PREPROCESSOR_FILE, native_config

    config = native_config(RELEASED_CODEC_CONFIG, dict(TINY_TEACHER_CONFIG, mask_time_prob=0.0))
    torch.manual_seed(seed)
    model = HiggsAudioV2TokenizerModel(HiggsAudioV2TokenizerConfig.from_dict(config)).eval()
    _fit_native_codebooks(model, _fitting_signal().view(1, 1, -1), seed)
    with _no_progress_bars():
        model.save_pretrained(out)  # config.json + model.safetensors
    (out / PREPROCESSOR_FILE).write_text(json.dumps(FEATURE_EXTRACTOR, indent=2))


def _fit_native_codebooks(model, signal, seed: int) -> None:
    """Each quantizer in turn: its codebook becomes seeded draws of the residual frames it sees on `signal`
    (projected in), each moved by a little seeded noise so no two entries tie (k-means' starting point);
    the next quantizer sees what this one leaves."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        residual = _native_latents(model, signal)
        for quantizer in model.quantizer.quantizers:
            frames = quantizer.project_in(residual.transpose(1, 2)).flatten(0, 1)
            rows = frames[torch.randint(len(frames), (quantizer.codebook.codebook_size,), generator=gen)]
            rows = rows + 0.1 * frames.std() * torch.randn(rows.shape, generator=gen)
            quantizer.codebook.embed.copy_(rows)
            quantizer.codebook.embed_avg.copy_(rows)
            residual = residual - quantizer.decode(quantizer.encode(residual))


def cache_dir() -> Path:
    return Path(os.environ.get("HIGGS_DS_CACHE", Path.home() / ".cache" / "higgs_ds"))


def resolve_codec(spec: str, device: str = "cpu") -> Codec:
    """`tiny` -> this environment's seeded tiny codec (built once into the cache, atomically); anything
    else is a path."""
    if spec != "tiny":
        return load_codec(spec, device)
    family = environment_family()
    target = cache_dir() / TINY_CODEC_VERSIONS[family]
    if not (target / WEIGHTS[family]).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-codec-", dir=target.parent))
        write_tiny_codec(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return load_codec(target, device)
