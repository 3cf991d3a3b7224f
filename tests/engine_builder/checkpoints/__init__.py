"""Tests of the checkpoint sources (engine_builder/checkpoints)."""
