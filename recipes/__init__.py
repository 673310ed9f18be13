"""Recipes that reproduce the paper's experiments, one command each.

``python -m recipes.NAME --config configs/NAME.yaml [key=value ...]`` — see :mod:`recipes.common`
for the shared command line, config handling, JSON-lines log and output folder.

- ``quadratic_ode`` — Fig. 4: Carleman error on random quadratic ODEs (order N, dissipative fraction f).
- ``mlp_ode_order`` — Theorem III.1: degree of the gradient-descent ODE of polynomial MLPs.
- ``hessian_after_pruning`` — Fig. 3: Hessian eigenvalue density of a ResNet right after 90% pruning.
- ``train_resnet_cifar100`` — Fig. 2: sparse training with QODE beside classical sparse SGD.
- ``demo`` — ``make demo``: ``train_resnet_cifar100`` on the CPU config (digits, a few minutes).
"""
