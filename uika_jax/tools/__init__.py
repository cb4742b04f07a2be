"""The `uika` console script and its subcommands (one module each)."""
