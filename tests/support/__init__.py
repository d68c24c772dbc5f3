"""Test doubles and drills shared by tests/ and bench/; runtime code (rl/, rollout/, policy/,
rewards/, deploy/) never imports from here."""
