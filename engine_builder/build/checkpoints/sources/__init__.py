"""One module per checkpoint source; the registry imports them lazily by name."""
