"""Adapters to other training frameworks (optional extras)."""
