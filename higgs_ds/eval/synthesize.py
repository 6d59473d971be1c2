"""`higgs-ds synthesize`: a model directory (a fine-tuned export or a base model, either family) + text -> WAV.

    higgs-ds synthesize MODEL_DIR --text "Hello there." --out listen/ [--ref-audio me.wav --ref-text "..."]
    higgs-ds synthesize MODEL_DIR --batch prompts.jsonl --out listen/

One code path with training and evaluation: each request becomes the conversation and shard-style record a
shard sample of the same task holds (higgs_ds.eval.synth_request), reference audio is encoded by the codec
the model was trained with into the record's codes, and higgs_ds.eval.generate makes the prompt
(prompt_from_record -> boson's prepare_chatml_sample tokens), generates (generate_codes: boson's loop or
transformers' own) and decodes (decode). What is written, in --out:

    ID.wav            float32 mono WAV at the codec's rate (24 kHz): exactly the codec's output, unclipped
    ID.codes.npy      the generated codes, uint16 (8, frames), no pickle
    synthesize.jsonl  a line per file written: text, references, scene, seed, sampling settings, frames,
                      seconds, model, codec (name and weights sha256), device; earlier lines are kept

Model directories are data (higgs_ds.models.trust): no remote code, no Python files, safetensors weights
loaded strictly. Every file is written atomically (higgs_ds.safe_io); an existing output is never replaced
without --overwrite. Requests are checked, and reference audio encoded, before the model is loaded: a bad
one is refused with its reason and does not cost a model load.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from higgs_ds.errors import UserError
from higgs_ds.eval.synth_output import Outputs
from higgs_ds.eval.synth_request import (
    Defaults,
    Reference,
    Refusal,
    RequestError,
    SynthRequest,
    prompt_record,
    read_batch,
)

FRAME_RATE = 25  # codec frames per second: every Higgs-Audio v2 codec (load_codec checks the geometry)


@dataclass(frozen=True)
class Sampling:
    """generate_codes' sampling settings (its defaults are boson's serve engine's)."""

    temperature: float = 0.7
    top_k: int | None = None  # None or 0: off
    top_p: float = 0.95
    ras_win_len: int | None = 7  # repetition-aware sampling window; None or 0: off
    ras_win_max_num_repeat: int = 2
    max_new_frames: int = 30 * FRAME_RATE

    def check(self) -> None:
        problems = [
            (not math.isfinite(self.temperature) or self.temperature < 0, "--temperature must be >= 0 (0: greedy)"),
            (self.top_k is not None and self.top_k < 0, "--top-k must be >= 0 (0: off)"),
            (not 0 < self.top_p <= 1, "--top-p must be in (0, 1] (1: off)"),
            (self.ras_win_len is not None and self.ras_win_len < 0, "--ras-win-len must be >= 0 (0: off)"),
            (self.ras_win_max_num_repeat < 1, "--ras-max-repeat must be >= 1"),
            (self.max_new_frames < 1, "--max-seconds / --max-frames must allow at least one frame"),
        ]
        for bad, message in problems:
            if bad:
                raise UserError(message)

    def generate_kwargs(self) -> dict:
        return dict(
            max_new_frames=self.max_new_frames,
            temperature=self.temperature,
            top_k=self.top_k or None,
            top_p=self.top_p,
            ras_win_len=self.ras_win_len or None,
            ras_win_max_num_repeat=self.ras_win_max_num_repeat,
        )


# ------------------------------------------------------------------ model, tokenizer, codec


def check_device(device: str) -> str:
    if device == "cpu":
        return device
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise UserError(f"--device {device!r}: use cpu or cuda (cuda:N for another GPU)")
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is visible to this process: use --device cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def torch_dtype(dtype: str, device: str):
    """auto: float32 on the CPU, bfloat16 on a GPU (the dtype Boson's serve engine runs the model in)."""
    import torch

    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    value = getattr(torch, dtype, None) if dtype in ("float32", "bfloat16", "float16") else None
    if value is None:
        raise UserError(f"--dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return value


def checked_model_dir(model_dir) -> tuple[Path, str]:
    """(path, family) of a model directory this environment can load, checked as data: no remote code."""
    from higgs_ds.models.family import require_model_family
    from higgs_ds.models.trust import check_model_dir, forbid_remote_code

    forbid_remote_code()
    path = check_model_dir(model_dir)
    return path, require_model_family(path)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    from higgs_ds.models.family import register_auto_classes

    register_auto_classes()  # a v3 config.json is read by our class, not guessed at
    return AutoTokenizer.from_pretrained(str(model_dir))


def load_model(model_dir: Path, family: str, dtype, device: str):
    """The family's model, strictly (every weight of the directory used, none missing), in eval mode."""
    from higgs_ds.models.family import NATIVE, V3

    if family == V3:
        from higgs_ds.models.v3.checkpoint import load_v3_model

        return load_v3_model(model_dir, dtype=dtype, device=device).eval()
    if family == NATIVE:
        from higgs_ds.models.native.load import load_native_model

        return load_native_model(model_dir, dtype=dtype, device=device).eval()
    import boson_multimodal.model.higgs_audio  # noqa: F401  registers the "higgs_audio" classes
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    from higgs_ds.models.strict import check_state_dict_matches, read_headers

    read_headers(model_dir)  # safetensors weights, before anything is loaded (never a pickle)
    model = HiggsAudioModel.from_pretrained(str(model_dir), torch_dtype=dtype, use_safetensors=True)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    persistent = model.state_dict().keys()
    shapes.update({name: tuple(b.shape) for name, b in model.named_buffers() if name in persistent})
    check_state_dict_matches(model_dir, shapes, "boson's HiggsAudioModel")
    return model.to(device).eval()


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # check_model_dir has parsed every JSON file of the directory already


def trained_codec(model_dir: Path) -> dict | None:
    """The codec a `higgs-ds export` was trained with (its codec.json: name, weights sha256), if recorded."""
    note = _read_json(model_dir / "codec.json")
    codec = note.get("codec") if isinstance(note, dict) else None
    return codec if isinstance(codec, dict) else None


def _processor_codec(model_dir: Path) -> str | None:
    """The local codec directory a native model's processor_config.json names (a hub id is not one)."""
    config = _read_json(model_dir / "processor_config.json")
    ref = config.get("audio_tokenizer") if isinstance(config, dict) else None
    name = ref.get("audio_tokenizer_name_or_path") if isinstance(ref, dict) else None
    if not isinstance(name, str) or not name:
        return None
    path = Path(name) if Path(name).is_absolute() else model_dir / name
    return str(path) if path.is_dir() else None


def _tiny_if_trained_on_it(trained: dict | None) -> str | None:
    from higgs_ds.models.family import environment_family
    from higgs_ds.shards.codec import TINY_CODEC_VERSIONS

    name = trained.get("codec") if trained else None
    return "tiny" if name == TINY_CODEC_VERSIONS[environment_family()] else None


def find_codec(model_dir: Path, spec: str | None, device: str):
    """(codec, warning or None): --codec, else the codec the model directory names (a native processor's
    local audio tokenizer, or the tiny codec an export says it was trained on). A codec whose weights differ
    from the ones the export was trained with is a warning (a converted copy of the same codec differs too)."""
    from higgs_ds.shards.codec import resolve_codec

    trained = trained_codec(model_dir)
    given = spec is not None
    spec = spec or _processor_codec(model_dir) or _tiny_if_trained_on_it(trained)
    named = (
        f" (its codec.json: {trained.get('codec')!r}, weights sha256 {trained.get('weights_sha256')})"
        if trained
        else ""
    )
    fix = (
        "pass --codec DIR, the codec the model's shards were built with (bosonai/higgs-audio-v2-tokenizer, "
        "downloaded once), or --codec tiny"
    )
    if spec is None:
        raise UserError(f"{model_dir} names no local codec{named}: {fix}")
    codec = resolve_codec(spec, device=device)
    sha = codec.provenance.get("weights_sha256")
    if trained and trained.get("weights_sha256") not in (None, sha):
        if not given and spec == "tiny":  # a guess from the codec's name alone, and the weights say otherwise
            raise UserError(f"{model_dir} names no local codec{named}, and this environment's tiny codec has "
                            f"weights sha256 {sha}: {fix}")  # fmt: skip
        return codec, (
            f"codec {codec.path} (weights sha256 {sha}) is not the one {model_dir} was trained with "
            f"({trained.get('codec')!r}, sha256 {trained.get('weights_sha256')}): fine for a converted copy of "
            "that codec, noise for another"
        )
    return codec, None


def encode_reference(codec, path: str, max_seconds: float) -> np.ndarray:
    """A reference recording -> codes (num_codebooks, T) uint16, decoded and resampled as the shard builder
    does (higgs_ds.shards.audio.load_audio); AudioError naming the file when it cannot be used."""
    from higgs_ds.shards.audio import load_audio

    rate, hop = codec.provenance["sample_rate"], codec.provenance["hop_length"]
    try:
        wave = load_audio(path, rate, max_seconds=max_seconds, min_seconds=hop / rate)
    except UserError as err:  # the loader names the shard builder's limit; here it is this flag
        raise UserError(str(err).replace("--max-seconds", "--max-reference-seconds")) from None
    return codec.encode(wave)


def check_geometry(model, codec) -> None:
    """The model reads and writes the codec's codes: the same codebooks, the same code vocabulary."""
    from higgs_ds.models.interface import geometry

    g, p = geometry(model.config), codec.provenance
    if (g.num_codebooks, g.code_vocab) != (p["num_codebooks"], p["codebook_size"]):
        raise UserError(
            f"the model has {g.num_codebooks} codebooks of {g.code_vocab} codes and codec {codec.path} "
            f"{p['num_codebooks']} of {p['codebook_size']}: pass the --codec the model was trained with"
        )


# ------------------------------------------------------------------ the run


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message)  # above a progress bar, when one is drawn


def _refuse(refused: list, request: SynthRequest, reason: str, say) -> None:
    refused.append(Refusal(request.source, request.line, request.name, reason))
    say(f"{request.source}: refused: {reason}")


def _claim(outputs: Outputs, requests: list[SynthRequest], refused: list, say) -> list[SynthRequest]:
    """The requests whose output files may be written (under the --out lock)."""
    kept = []
    for request in requests:
        reason = outputs.blocked(request.name)
        if reason:
            _refuse(refused, request, reason, say)
        else:
            kept.append(request)
    return kept


def _prompt_check(family: str):
    """The family's prompt building, run once on each request so a text it refuses is refused up front."""
    from higgs_ds.models.family import V3

    if family != V3:
        from higgs_ds.eval.generate import prompt_from_record

        return prompt_from_record
    from higgs_ds.models.v3.generate import record_prompt

    def v3_prompt(record: dict, tokenizer):
        if (record["json"].get("scene") or "").strip():
            raise UserError(
                "Higgs TTS 3 prompts have no scene description (no system turn): drop --scene and put inline "
                "control tags such as <|emotion:elation|> or <|style:whispering|> in the text"
            )
        return record_prompt(record, tokenizer)

    return v3_prompt


def _prepare(requests, codec, tokenizer, family: str, max_reference_seconds: float, refused: list, say) -> list:
    """(request, record) for each request whose references encode and whose prompt tokenizes; each reference
    file is encoded once (a batch usually clones one voice)."""
    check_prompt = _prompt_check(family)
    encoded: dict[str, np.ndarray | UserError] = {}
    ready = []
    for request in requests:
        try:
            codes = []
            for i, ref in enumerate(request.references):
                if ref.audio not in encoded:
                    try:
                        encoded[ref.audio] = encode_reference(codec, ref.audio, max_reference_seconds)
                    except UserError as err:
                        encoded[ref.audio] = UserError(f"reference {i}: {err}")
                if isinstance(encoded[ref.audio], UserError):
                    raise encoded[ref.audio]
                codes.append(encoded[ref.audio])
            record = prompt_record(request, codes, codec.provenance["num_codebooks"])
            if request.scene:
                record["json"]["scene"] = request.scene  # for the check only: v2 has it in the system turn
            check_prompt(record, tokenizer)  # a text the family's prompt building refuses is refused here
            ready.append((request, record))
        except UserError as err:
            _refuse(refused, request, str(err), say)
    return ready


@dataclass(frozen=True)
class _Context:
    model_dir: Path
    family: str
    device: str
    dtype: str
    sampling: Sampling


def _entry(request: SynthRequest, record: dict, codes: np.ndarray, wave: np.ndarray, codec, ctx: _Context) -> dict:
    """The manifest line of one written file: enough to make it again."""
    rate = int(codec.provenance["sample_rate"])
    frames = int(codes.shape[1])
    refs = [
        {"audio": ref.audio, "text": ref.text, "frames": item["frames"]}
        for ref, item in zip(request.references, record["json"]["audio"])
    ]
    return {
        "id": request.name,
        "wav": f"{request.name}.wav",
        "codes": f"{request.name}.codes.npy",
        "text": request.text,
        "references": refs,
        "scene": request.scene,
        "system": request.system,
        "seed": request.seed,
        "sampling": asdict(ctx.sampling),
        "frames": frames,
        "seconds": round(len(wave) / rate, 3),
        "sample_rate": rate,
        "stopped": "frame limit" if frames >= ctx.sampling.max_new_frames else "end of audio",
        "model": str(ctx.model_dir.resolve()),
        "family": ctx.family,
        "codec": {
            "name": codec.provenance.get("codec"),
            "path": codec.path,
            "weights_sha256": codec.provenance.get("weights_sha256"),
        },
        "device": ctx.device,
        "dtype": ctx.dtype,
        "source": request.source,
    }


def _written_message(request: SynthRequest, path: Path, entry: dict, max_frames: int) -> str:
    message = (
        f"{request.source}: wrote {path} ({entry['seconds']:.2f} s, {entry['frames']} frames, seed {request.seed})"
    )
    if entry["frames"] == 0:
        message += " - empty: the model ended the audio at once"
    elif entry["frames"] >= max_frames:
        message += " - reached the frame limit, the audio may be cut: raise --max-seconds"
    return message


def synthesize(
    model_dir,
    requests: list[SynthRequest],
    out,
    sampling: Sampling = Sampling(),
    *,
    codec: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    overwrite: bool = False,
    max_reference_seconds: float = 30.0,
    refused: list[Refusal] = (),
    progress: bool | None = None,
    say=_say,
) -> dict:
    """Write each request's WAV, codes and manifest line into `out`; requests refused here (existing
    outputs, reference audio that cannot be used, text the tokenizer refuses) join `refused`. Returns
    {"written": [manifest entries], "refused": [Refusal], "manifest": path}. Nothing is loaded for a run
    whose requests are all refused."""
    sampling.check()
    device = check_device(device)
    dtype_value = torch_dtype(dtype, device)
    model_path, family = checked_model_dir(model_dir)
    outputs, refused, written, ready = Outputs(out, overwrite), list(refused), [], []
    for r in refused:
        say(f"{r.source}: refused: {r.reason}")
    with outputs.lock():
        requests = _claim(outputs, list(requests), refused, say)
        if requests:
            codec_obj, warning = find_codec(model_path, codec, device)
            if warning:
                say(f"warning: {warning}")
            tokenizer = load_tokenizer(model_path)
            ready = _prepare(requests, codec_obj, tokenizer, family, max_reference_seconds, refused, say)
        if ready:
            model = load_model(model_path, family, dtype_value, device)
            check_geometry(model, codec_obj)
            ctx = _Context(model_path, family, device, str(dtype_value).removeprefix("torch."), sampling)
            written = _generate_all(ready, model, tokenizer, codec_obj, outputs, ctx, progress, say)
    return {"written": written, "refused": refused, "manifest": str(outputs.manifest)}


def _generate_all(ready, model, tokenizer, codec, outputs: Outputs, ctx: _Context, progress, say) -> list[dict]:
    """Generate, decode and write each prepared request in turn; the manifest entries written."""
    from tqdm import tqdm

    from higgs_ds.eval.generate import decode, generate_codes

    written = []
    for request, record in tqdm(
        ready, desc="synthesize", unit="prompt", disable=None if progress is None else not progress
    ):
        codes = generate_codes(
            model, tokenizer, record, seed=request.seed, synced_gpus=False, **ctx.sampling.generate_kwargs()
        )
        wave = decode(codec, codes)
        entry = _entry(request, record, codes, wave, codec, ctx)
        path = outputs.write(request.name, wave, codes, entry["sample_rate"], entry)
        written.append(entry)
        say(_written_message(request, path, entry, ctx.sampling.max_new_frames))
    return written


# ------------------------------------------------------------------ the command line


def _cli_references(args) -> tuple[Reference, ...]:
    audio, text = args.ref_audio or [], args.ref_text or []
    if len(audio) != len(text):
        raise UserError(
            f"{len(audio)} --ref-audio and {len(text)} --ref-text: give each reference recording with its "
            "transcript (--ref-audio A.wav --ref-text 'what A says', once per speaker)"
        )
    return tuple(Reference(a, t) for a, t in zip(audio, text))


def _sampling(args) -> Sampling:
    if args.max_frames is None and not (math.isfinite(args.max_seconds) and args.max_seconds > 0):
        raise UserError(f"--max-seconds must be a positive number, got {args.max_seconds}")
    frames = args.max_frames if args.max_frames is not None else math.ceil(args.max_seconds * FRAME_RATE)
    return Sampling(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        ras_win_len=args.ras_win_len,
        ras_win_max_num_repeat=args.ras_max_repeat,
        max_new_frames=frames,
    )


def run_cli(args) -> int:
    """`higgs-ds synthesize` (higgs_ds.cli): one --text, or a --batch JSONL; exit 2 when anything was refused."""
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be an integer from 0 to 2**63 - 1, got {args.seed}")
    if args.batch is not None and args.name is not None:
        raise UserError("--name names the --text output; in a --batch each line names its own with 'id'")
    if not (math.isfinite(args.max_reference_seconds) and args.max_reference_seconds > 0):
        raise UserError(f"--max-reference-seconds must be a positive number, got {args.max_reference_seconds}")
    defaults = Defaults(_cli_references(args), args.scene, args.system, args.seed)
    sampling = _sampling(args)
    sampling.check()
    if args.text is not None:
        name = args.name or "synthesis"
        request = SynthRequest(name, args.text, defaults.references, defaults.scene, defaults.system, args.seed)
        try:
            request.check()
        except RequestError as err:
            raise UserError(f"--text: {err}") from None
        requests, refused, lines, where = [request], [], 1, "--text"
    else:
        batch = read_batch(args.batch, defaults)
        requests, refused, lines, where = batch.requests, batch.refused, batch.lines, args.batch
    started = time.perf_counter()
    result = synthesize(
        args.model_dir,
        requests,
        args.out,
        sampling,
        codec=args.codec,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
        max_reference_seconds=args.max_reference_seconds,
        refused=refused,
    )
    written, refused = result["written"], result["refused"]
    if len(written) + len(refused) != lines:  # every input line is accounted for, or this is a bug
        raise RuntimeError(f"{lines} lines, but {len(written)} written and {len(refused)} refused")
    print(
        f"synthesize: {len(written)} written, {len(refused)} refused of {lines} from {where} in "
        f"{time.perf_counter() - started:.1f} s; manifest {result['manifest']}"
    )
    if refused and args.text is not None:
        raise UserError(refused[0].reason)
    if refused:
        raise UserError(f"{len(refused)} of {lines} lines of {where} refused (each named above, with the fix)")
    return 0
