"""Test doubles at external seams; `tensorrt_llm/` here is the one fake of this project (see fixture.py)."""
