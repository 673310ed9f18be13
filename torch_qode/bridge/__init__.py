"""Floor 2, the autograd bridge: Taylor terms of a real loss, the Hessian spectrum and the dissipation
check, pruning, flat-parameter helpers and decomposed norms.  Imports the math core only."""
