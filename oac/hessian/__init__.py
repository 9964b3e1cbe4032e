"""Hessian sources: what a solver is fed. Layer-wise 2XᵀX (GPTQ family) or OAC's output-adaptive Ĥ."""
