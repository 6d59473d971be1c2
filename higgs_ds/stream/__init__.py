"""Stage 5-7: per-rank epoch plan and shard stream -> sample tokens -> model batches."""
