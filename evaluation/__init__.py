"""Evaluation: GenEval folder layout, result summaries and a procedural shapes world for CPU tests."""
