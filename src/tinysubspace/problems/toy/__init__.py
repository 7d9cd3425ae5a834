"""The solvable toy model of Section 3 and Appendix E (``ts.toy``): softmax regression over a
Gaussian mixture, trained by gradient descent and measured like a real network.

* :mod:`~tinysubspace.problems.toy.model`: the data, the loss (eq. 6), its gradient and Hessian in
  closed form (dense and as an operator), the exact non-zero spectrum;
* :mod:`~tinysubspace.problems.toy.simulation`: the run (:class:`ToyConfig` → :func:`simulate` →
  :class:`ToySimulation`) and its measurements;
* :mod:`~tinysubspace.problems.toy.analytic`: the late-time closed form of eqs. 14–19 and its fit.

Every public name of the three is re-exported here (``ts.toy.<name>``).
"""

from tinysubspace.problems.toy.analytic import (
    LateTimeSolution,
    approximate_loss,
    discrete_drift,
    equal_margin_spectrum,
    fit_late_time,
    is_analytic_case,
    leading_gradient,
    leading_hessian,
    mean_direction_eigenvalues,
)
from tinysubspace.problems.toy.model import (
    SoftmaxHessian,
    ToyData,
    data_span_spectrum,
    linearized_gradient_step,
    make_toy_data,
    softmax_gradient,
    softmax_hessian,
    softmax_loss,
)
from tinysubspace.problems.toy.simulation import (
    ToyConfig,
    ToySimulation,
    measurement_steps,
    power_law_exponent,
    sigma_sweep,
    simulate,
    subspace_overlaps,
)

__all__ = [
    "LateTimeSolution",
    "SoftmaxHessian",
    "ToyConfig",
    "ToyData",
    "ToySimulation",
    "approximate_loss",
    "data_span_spectrum",
    "discrete_drift",
    "equal_margin_spectrum",
    "fit_late_time",
    "is_analytic_case",
    "leading_gradient",
    "leading_hessian",
    "linearized_gradient_step",
    "make_toy_data",
    "mean_direction_eigenvalues",
    "measurement_steps",
    "power_law_exponent",
    "sigma_sweep",
    "simulate",
    "softmax_gradient",
    "softmax_hessian",
    "softmax_loss",
    "subspace_overlaps",
]
