"""Figures drawn from run folders only (``figures``, ``arrays``, ``common``), the toy model's
figures (``toy``) and the offline HTML report (``report``). Never trains or computes a Hessian."""
