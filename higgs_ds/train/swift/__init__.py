"""The only package that imports ms-swift."""
