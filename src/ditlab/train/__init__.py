"""Training: the Trainer loop, atomic checkpoints, EMA, DDP/FSDP, and the CPU quickstart."""
