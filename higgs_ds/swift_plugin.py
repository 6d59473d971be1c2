"""The file ms-swift's own CLI imports: `swift sft --external_plugins higgs_ds/swift_plugin.py ...`.

The plugin itself lives in higgs_ds.train.swift (the only package that imports ms-swift); this entry imports
the modules that install it: register (model types, template, trainer; only checked local model directories),
cli_hooks (SwiftSft trains from shard directories given as --dataset), cpu and redact (no credential in a
checkpoint). Imported by path (SWIFT makes up a module name), it is also the one moment, while SWIFT parses its
arguments and before it builds the trainer's, when a single process or several CPU ranks can be set up for
DeepSpeed.
"""

import sys

from higgs_ds.train.swift import cli_hooks, cpu, redact, register  # noqa: F401  installed at import

if __name__ != "higgs_ds.swift_plugin":
    cpu.configure_single_process("--deepspeed" in sys.argv)
    cpu.configure_cpu_ranks("--deepspeed" in sys.argv)
