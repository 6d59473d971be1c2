"""Stage 8-9: run config, loss, checkpoints, metrics, and the SWIFT trainer (train.swift)."""
