"""Sub-commands of the ``tinysubspace`` CLI (one module each)."""
