"""Floor 2, the autograd bridge: a real loss as the paper's polynomial ODE and its spectrum.

``taylor`` (F0..Fq of a loss, Eq. II.1/V.5, explicit or matrix-free) on ``engines`` (double backward,
torch.func); ``lanczos`` and ``spectrum`` (Lanczos, SLQ density, error proxy Eq. III.12–III.15,
``hessian_spectrum``); ``dissipation`` (the check, Verdict); ``pruning`` (the top-r download);
``flat`` (flat-parameter helpers) and ``norms`` (decomposed normalisation layers); ``pyhessian``
(the reference adapter, imported on use).  Imports the math core and ``torch_qode._checks`` only."""
