"""The paper's networks by name (``networks``, ``resnet``) and their anatomy by layer
(``anatomy``)."""

from tinysubspace.problems.models.anatomy import (
    ParameterGroup,
    label_parameters,
    parameter_group_slices,
    parameter_groups,
)
from tinysubspace.problems.models.networks import build_model, model_names

__all__ = [
    "ParameterGroup",
    "build_model",
    "label_parameters",
    "model_names",
    "parameter_group_slices",
    "parameter_groups",
]
