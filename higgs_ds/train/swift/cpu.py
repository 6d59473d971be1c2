"""A single process, or several CPU ranks, set up for DeepSpeed and the trainer.

* Without torchrun (`higgs-ds train CONFIG` on a laptop, `swift sft` without NPROC_PER_NODE) the run is one
  rank of one, given a one-process torchrun environment for DeepSpeed (configure_single_process);
* on a CPU-only host with several ranks, accelerate's gloo state is made before the trainer's arguments
  (configure_cpu_ranks), and reused by them (installed at import), only when there are several ranks.

Both are called by the entries: higgs_ds.train.swift.launch.run_training, and higgs_ds/swift_plugin.py
while SWIFT parses its arguments, before it builds the trainer's.
"""

from __future__ import annotations

import json
import multiprocessing
import os

import torch
from swift.trainers import TrainerFactory


def configure_single_process(use_deepspeed: bool) -> None:
    """A run started without torchrun (`higgs-ds train CONFIG` on a laptop, `swift sft` without
    NPROC_PER_NODE) is one rank of one. DeepSpeed still initialises a process group, and without torchrun's
    environment it goes looking for MPI (mpi4py, absent); give it the environment of a one-process torchrun
    on a free local port instead."""
    if not use_deepspeed or any(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return
    if multiprocessing.parent_process() is not None:
        return  # a dataloader worker re-importing the plugin entry
    import socket

    with socket.socket() as s:  # a free port, so two single-process runs on one host do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    os.environ.update(env)
    os.environ.setdefault("MASTER_PORT", str(port))


def configure_cpu_ranks(use_deepspeed: bool) -> None:
    """On a CPU-only host with several ranks, create accelerate's state with the gloo backend before the
    trainer's arguments do: transformers 4.46 builds it there with no backend and counts one process.
    The trainer reuses it with --ddp_backend gloo --accelerator_config '{"use_configured_state": true}'."""
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if torch.distributed.is_initialized() or multiprocessing.parent_process() is not None:
        return  # already set up, or a dataloader worker re-importing the plugin entry: never a second group
    import accelerate

    if use_deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    accelerate.PartialState(backend="gloo")


def _reuse_cpu_state_in_training_args() -> None:
    """`--ddp_backend gloo --accelerator_config '{"use_configured_state": true}'`, given for the user, when
    configure_cpu_ranks made the gloo state (several CPU ranks), and only then: with one process there is no
    state to reuse and accelerate refuses the flag. SftArguments builds the trainer's arguments (and sets up
    their devices) through TrainerFactory.get_training_args, after importing the plugin entry (`swift sft`) or
    after run_training made the state (`higgs-ds train`)."""
    swift_get_training_args = TrainerFactory.get_training_args
    if getattr(swift_get_training_args, "higgs_ds_hook", False):
        return  # this module imported twice (by path and by name)

    def get_training_args(cls, args):
        from accelerate import PartialState

        if not torch.cuda.is_available() and PartialState._shared_state:  # made by configure_cpu_ranks
            args.ddp_backend = args.ddp_backend or "gloo"
            config = args.accelerator_config
            if isinstance(config, str) and not os.path.isfile(config):  # inline JSON, not a file
                config = json.loads(config)
            if isinstance(config, dict):
                args.accelerator_config = dict(config, use_configured_state=True)
        return swift_get_training_args(args)

    get_training_args.higgs_ds_hook = True
    TrainerFactory.get_training_args = classmethod(get_training_args)


_reuse_cpu_state_in_training_args()
