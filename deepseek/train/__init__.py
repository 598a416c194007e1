"""Training: data loading and packing (data.py); the trainer and checkpoints live beside it."""
