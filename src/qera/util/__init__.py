"""Utilities every stage may use: errors, registries, atomic writes, memory sizes, timers."""
