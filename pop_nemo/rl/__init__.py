"""RL math (advantages, losses), the online loop, pairing and DPO."""
