"""Stage 3 of the data flow: waveform (24 kHz mono) -> Higgs-Audio v2 codec codes, uint16 (8, T).

A codec directory holds what the released `bosonai/higgs-audio-v2-tokenizer` holds: `config.json`
(HiggsAudioTokenizer constructor arguments) and `model.pth` (its state dict). The released constructor
downloads its HuBERT teacher from the hub; here the teacher is built from a local config instead
(`semantic_teacher/config.json` in the codec directory, else transformers' HubertConfig defaults, which
are HuBERT-base) and its weights come from `model.pth` like every other weight. Loading is strict: a
missing or unexpected key is an error (the upstream loader passes strict=False and ignores them).

    codec = load_codec("/path/to/higgs-audio-v2-tokenizer")   # or resolve_codec("tiny")
    codes = codec.encode(wave_24k)                            # np.uint16 (8, ceil(n / 960))
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
from higgs_ds.models.tiny import CODEBOOK_SIZE, CODEC_RATIOS, CODEC_SAMPLE_RATE, NUM_CODEBOOKS

# The released codec's config.json (bosonai/higgs-audio-v2-tokenizer).
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
TINY_CODEC_VERSION = "tiny-codec-v2"


class CodecError(UserError):
    """A codec directory that cannot be used; the message says what is wrong and how to fix it."""


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
        """(B, N) waveforms of exactly equal length -> (B, num_codebooks, T). Zero-padding clips of
        different lengths into one batch would change their codes, so callers group by length."""
        import torch

        assert waves.ndim == 2, waves.shape
        x = torch.from_numpy(np.ascontiguousarray(waves, dtype=np.float32)).unsqueeze(1).to(self.model.device)
        with torch.inference_mode():
            if len(x) == 1:
                codes = self.model._xcodec_encode(x).audio_codes  # (1, n_q, T): the upstream path itself
            else:
                codes = _xcodec_encode_batched(self.model, x)
        codes = codes.cpu().numpy()
        assert codes.max(initial=0) < self.provenance["codebook_size"], "codec produced an out-of-range code"
        return codes.astype(np.uint16)


def _xcodec_encode_batched(model, x):
    """HiggsAudioTokenizer._xcodec_encode for B > 1. Upstream re-pads with `x[:, 0, :] ... .unsqueeze(0)`,
    which only works for B == 1; this is the same computation with the batch axis kept (tests check it
    against upstream batch-1 codes)."""
    import torch
    import torch.nn.functional as F

    e_semantic = model.encoder_semantic(model.get_regress_target(x).detach().transpose(1, 2))
    e_acoustic = model.encoder(x)
    if e_acoustic.shape[2] != e_semantic.shape[2]:
        pad = 160 * model.semantic_downsample_factor
        e_acoustic = model.encoder(F.pad(x[:, 0, :], (pad, pad)).unsqueeze(1))
    frames = min(e_acoustic.shape[2], e_semantic.shape[2])
    e = torch.cat([e_acoustic[:, :, :frames], e_semantic[:, :, :frames]], dim=1)
    e = model.fc_prior(e.transpose(1, 2)).transpose(1, 2)
    _, codes, _, _ = model.quantizer(e, model.frame_rate, None)
    return codes.permute(1, 0, 2)


def load_codec(path: str | os.PathLike, device: str = "cpu") -> Codec:
    """Load a codec directory strictly (see module docstring)."""
    import torch

    path = Path(path)
    if not path.is_dir():
        raise CodecError(
            f"codec directory {path} does not exist (pass the folder of the released "
            "bosonai/higgs-audio-v2-tokenizer, or 'tiny' for the test codec)"
        )
    config_path, weights_path = path / "config.json", path / "model.pth"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise CodecError(
                f"codec directory {path} has no {p.name}; expected config.json and model.pth as in "
                "bosonai/higgs-audio-v2-tokenizer (download it once, or use --codec tiny for a test codec)"
            )
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
    if model.n_q != NUM_CODEBOOKS or model.sample_rate != CODEC_SAMPLE_RATE:
        raise CodecError(
            f"codec at {path} has {model.n_q} codebooks at {model.sample_rate} Hz; Higgs-Audio v2 needs "
            f"{NUM_CODEBOOKS} at {CODEC_SAMPLE_RATE} Hz"
        )
    provenance = {
        "codec": _codec_name(path),
        "codec_path": str(path.resolve()),
        "weights_sha256": sha256_file(weights_path),
        "sample_rate": int(model.sample_rate),
        "hop_length": int(model.hop_length),
        "frame_rate": int(model.frame_rate),
        "num_codebooks": int(model.n_q),
        "codebook_size": int(config.get("bins", CODEBOOK_SIZE)),
    }
    return Codec(model=model, path=str(path), provenance=provenance)


def _codec_name(path: Path) -> str:
    marker = path / "higgs_ds_codec.json"
    return json.loads(marker.read_text())["name"] if marker.is_file() else "higgs-audio-v2-tokenizer"


def write_tiny_codec(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a random-weight codec directory in the released layout (plus the teacher config).

    The RVQ codebooks are built with kmeans_init: untrained, they hold zeros and are fitted to the first
    batch ever encoded, so codes would depend on which clip came first. Here they are fitted once, at
    build time, to a fixed seeded signal, and saved as initialised like the released checkpoint's."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = _construct(RELEASED_CODEC_CONFIG, TINY_TEACHER_CONFIG, "cpu").eval()
    t = torch.arange(4 * CODEC_SAMPLE_RATE) / CODEC_SAMPLE_RATE
    signal = 0.3 * torch.sin(2 * torch.pi * (120 + 400 * t) * t) + 0.05 * torch.randn(len(t))
    with torch.inference_mode():
        model._xcodec_encode(signal.view(1, 1, -1))
    assert _uninitialised_codebooks(model) == []
    torch.save(model.state_dict(), out / "model.pth")
    (out / "config.json").write_text(json.dumps(RELEASED_CODEC_CONFIG, indent=1))
    (out / "higgs_ds_codec.json").write_text(json.dumps({"name": TINY_CODEC_VERSION, "seed": seed}))
    (out / "semantic_teacher").mkdir(exist_ok=True)
    (out / "semantic_teacher" / "config.json").write_text(json.dumps(TINY_TEACHER_CONFIG, indent=1))
    return out


def _uninitialised_codebooks(model) -> list[str]:
    return [name for name, buf in model.named_buffers() if name.endswith("inited") and not bool(buf.all())]


def cache_dir() -> Path:
    return Path(os.environ.get("HIGGS_DS_CACHE", Path.home() / ".cache" / "higgs_ds"))


def resolve_codec(spec: str, device: str = "cpu") -> Codec:
    """`tiny` -> the seeded tiny codec (built once into the cache, atomically); anything else is a path."""
    if spec != "tiny":
        return load_codec(spec, device)
    target = cache_dir() / TINY_CODEC_VERSION
    if not (target / "model.pth").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-codec-", dir=target.parent))
        write_tiny_codec(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return load_codec(target, device)
