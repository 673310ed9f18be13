"""Recipes that reproduce the paper's experiments, one command each.

``python -m recipes.NAME --config configs/NAME.yaml [key=value ...]``.  The shared plumbing:

- :mod:`recipes.config` — the config schema, YAML files, overrides, and value checks naming the key;
- :mod:`recipes.cli` — the command line and the run (``setup``, ``Run``: output folder, device, threads, seeds);
- :mod:`recipes.loop` — the JSON-lines log, progress bars, tables, evaluation and plain SGD training;
- :mod:`recipes.checkpoints` — ``state_dict`` files, read with ``torch.load(..., weights_only=True)``;
- :mod:`recipes.classification` — the ``data`` section, datasets and pre-trained ResNet of the classifier recipes.

- ``quadratic_ode`` — Fig. 4: Carleman error on random quadratic ODEs (order N, dissipative fraction f).
- ``mlp_ode_order`` — Theorem III.1: degree of the gradient-descent ODE of polynomial MLPs.
- ``hessian_after_pruning`` — Fig. 3: Hessian eigenvalue density of a ResNet right after 90% pruning.
- ``train_resnet_cifar100`` — Fig. 2: sparse training with QODE beside classical sparse SGD.
- ``demo`` — ``make demo``: ``train_resnet_cifar100`` on the CPU config (digits, a few minutes).
"""
