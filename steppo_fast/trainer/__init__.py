"""Thin reference trainer."""
