"""Run folders: writing and reading them (``store``), Table 1 (``table1``), run summaries
(``summary``) and comparisons of projected-training runs (``projected``). Knows files, not models.
"""
