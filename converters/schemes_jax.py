"""Naming schemes of third-party JAX diffusion codebases (filled in per codebase)."""
