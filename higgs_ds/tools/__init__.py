"""Commands around training: preflight, export, the demo."""
