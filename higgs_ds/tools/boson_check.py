"""Reload a boson-format export in boson's environment and compare its logits with the trained model's.

    .venv-boson/bin/python -m higgs_ds.tools.boson_check EXPORT_BOSON --run OUTPUT_DIR

A run of the native family writes probe.pt: its logits on the first micro-batch of epoch 0 (one rank's view),
in the native batch layout. Here boson's HiggsAudioModel loads the converted export (strictly: every weight
used, none missing), boson's collator lays out the same samples (read from the run's shards with the run's
data settings), and the logits are compared position by position: both layouts expand every audio item to
the same T + K + 1 positions, so the valid positions correspond one to one. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from higgs_ds.errors import UserError, report


def compare(export_dir: str, run_dir: str, atol: float = 1e-5, rtol: float = 1e-4) -> dict:
    import boson_multimodal.model.higgs_audio  # noqa: F401  registers the "higgs_audio" classes
    import torch
    from boson_multimodal.model.higgs_audio import HiggsAudioModel
    from transformers import AutoTokenizer

    from higgs_ds.models.family import require_model_family
    from higgs_ds.models.interface import logits_for_loss, make_collator
    from higgs_ds.models.strict import check_state_dict_matches
    from higgs_ds.models.trust import check_model_dir, forbid_remote_code
    from higgs_ds.stream.loader import ShardStream
    from higgs_ds.train.config import build
    from higgs_ds.train.run import TrainConfig

    forbid_remote_code()
    check_model_dir(export_dir)
    require_model_family(export_dir)
    run = Path(run_dir)
    probe = torch.load(run / "probe.pt", map_location="cpu", weights_only=True)
    if probe.get("family") != "native":
        raise UserError(f"{run / 'probe.pt'} is not a native run's probe: check-export compares a boson run's export")
    cfg = build(TrainConfig, json.loads((run / "higgs_ds_config.json").read_text()))
    model = HiggsAudioModel.from_pretrained(export_dir, torch_dtype=torch.float32).eval()
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    check_state_dict_matches(export_dir, shapes, "boson's HiggsAudioModel")
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    samples = next(iter(ShardStream(cfg.data, tokenizer, rank=0, world_size=1)))  # what save_probe collated
    batch = make_collator(model.config, tokenizer, "boson")(samples)
    with torch.no_grad():
        out = logits_for_loss(model, batch, "boson")
    native_mask = probe["batch"]["attention_mask"].bool()
    width = min(native_mask.shape[1], out.text_logits.shape[1])
    valid = native_mask[:, :width]
    text_boson, text_native = out.text_logits[:, :width][valid].float(), probe["logits"][:, :width][valid]
    pairs = ((text_boson, text_native), (out.audio_logits.float(), probe["audio_logits"]))
    same_shape = all(a.shape == b.shape for a, b in pairs) and int(native_mask.sum()) == int(valid.sum())
    return {
        "positions": int(valid.sum()),
        "audio_positions": int(out.audio_logits.shape[0]),
        "max_abs_diff_logits": (pairs[0][0] - pairs[0][1]).abs().max().item() if same_shape else None,
        "max_abs_diff_audio_logits": (pairs[1][0] - pairs[1][1]).abs().max().item() if same_shape else None,
        "equal": same_shape and all(torch.allclose(a, b, atol=atol, rtol=rtol) for a, b in pairs),
        "atol": atol,
        "rtol": rtol,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m higgs_ds.tools.boson_check", description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir", help="a boson-format export (higgs-ds export --format boson, or convert --to boson)")
    p.add_argument("--run", required=True, help="the native run's output_dir (probe.pt, higgs_ds_config.json)")
    args = p.parse_args(argv)
    try:
        result = compare(args.export_dir, args.run)
    except UserError as err:
        return report(err)
    print(json.dumps(result))
    return 0 if result["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
