"""The file ms-swift's own CLI imports: `swift sft --external_plugins higgs_ds/swift_plugin.py ...`.

The plugin itself lives in higgs_ds.train.swift.plugin (the only package that imports ms-swift); this
entry imports it, which registers the model types, templates and trainer, and hooks SwiftSft. Imported
by path (SWIFT makes up a module name), it is also the one moment, while SWIFT parses its arguments and
before it builds the trainer's, when a single process or several CPU ranks can be set up for DeepSpeed.
"""

import sys

from higgs_ds.train.swift import plugin

if __name__ != "higgs_ds.swift_plugin":
    plugin.configure_single_process("--deepspeed" in sys.argv)
    plugin.configure_cpu_ranks("--deepspeed" in sys.argv)
