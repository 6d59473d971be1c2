"""Stage 9 of the data flow, and the only package that imports ms-swift.

Higgs-Audio v2 registered with ms-swift 4.x, trained by SWIFT's own loop (Seq2SeqTrainer on HF Trainer, with
DeepSpeed), from `higgs-ds train` or from `swift sft --external_plugins higgs_ds/swift_plugin.py`. The modules,
in the order a run meets them:

* register: the model types (either family's class, strictly loaded, never trust_remote_code), the template
  and the trainer, registered at import; SWIFT resolves only checked local model directories;
* template: boson's batch layout (higgs_ds.stream.collate) and the loss (higgs_ds.train.loss), which the
  model's forward does not compute;
* trainer: the per-rank shard stream's DataLoader (no rank-0 dispatcher), its position in every checkpoint,
  the step-wide target counts, higgs-ds' callbacks; save_probe for the export check;
* pipeline: HiggsSft, `higgs-ds train`'s SwiftSft, whose run config chooses the data and the resume;
* cli_hooks: SwiftSft hooked at import, so that `swift sft --dataset SHARD_DIR` trains from the same stream;
* cpu: a single process, or several CPU ranks, set up for DeepSpeed (and reused by the trainer's arguments);
* redact: credentials kept out of args.json, config copies and training_args.bin;
* env: the `swift sft` settings SWIFT has no flag for, read from the environment;
* launch: the SWIFT arguments of a run config, and `higgs-ds train`'s run.

Both entries (higgs_ds/swift_plugin.py and launch) import register, cli_hooks, cpu and redact, whose imports
install everything; each installation is idempotent and patches its own part of ms-swift or transformers.
"""

# Before any module here imports ms-swift (and with it peft): peft 0.20 on transformers 4.46 needs it first.
import torch.distributed.tensor  # noqa: F401
