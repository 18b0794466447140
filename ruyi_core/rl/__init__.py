"""Reinforcement learning on one tier: GRPO (TRL's GRPOTrainer) with verifiable rewards, training only the
tier's own parameters so that every other tier of the family stays bit-identical."""
