"""The training core: state and step, losses, optimizer, checkpointing, loop, logging."""
