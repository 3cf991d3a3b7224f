"""Serve stage: the torch engine, decoding features, encoders, the HTTP server and the backend seam."""
