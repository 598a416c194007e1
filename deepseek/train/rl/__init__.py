"""GRPO reinforcement learning: rollouts (rollout.py), the loss (loss.py) and the training stage (grpo.py)."""
