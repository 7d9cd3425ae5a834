"""Process-level concerns: process groups (``distributed``), thread counts."""
