"""Experiments: the config tree (``config``), the paper's settings as data (``catalog``,
``configs/*.toml``), building a problem from a config (``build``, ``optimizers``), the measurement
tracker (``tracker``), the training loop (``training``) and its progress line (``progress``).

Uses optim, problems and results; the CLI and the integrations stand on it.
"""
