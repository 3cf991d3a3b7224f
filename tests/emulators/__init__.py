"""Emulators and local servers the storage tests start on 127.0.0.1 (see install.sh for the npm ones)."""
