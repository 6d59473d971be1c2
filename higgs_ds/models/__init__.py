"""The model families: detection, loading, trust checks, tiny models built offline."""
