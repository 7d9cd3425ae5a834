"""What is studied: ``models`` (the paper's networks by name, their anatomy), ``datasets`` (files,
tensors, synthetic sets), ``toy`` (Section 3's solvable model), and ``registry`` (the name lookup
both catalogues use). Stands alone or uses the curvature core.
"""
