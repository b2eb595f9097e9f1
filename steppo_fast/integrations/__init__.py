"""Adapters for existing RL engines."""
