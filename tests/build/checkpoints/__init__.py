"""Tests of the checkpoint sources (engine_builder/build/checkpoints)."""
