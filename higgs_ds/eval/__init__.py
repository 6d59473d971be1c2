"""Validation sets and generated validation audio."""
