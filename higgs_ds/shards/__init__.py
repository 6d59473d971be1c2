"""Stage 1-4: manifest -> audio -> codec codes -> tar shards + index, and their checks."""
