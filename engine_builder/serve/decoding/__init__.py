"""Decoding features on top of the engine: incremental detokenization, stop strings, grammars, lookahead, tool calls."""
