"""Floor 1, the math core: polynomial ODEs, Carleman linearisation, the window system and its solvers,
tomography and the resource ledger.  numpy/scipy/torch tensors only: nothing here knows nn.Module.

Where to extend (each registry is a name -> class dict, :class:`~torch_qode.core.registry.Registry`):

* a Carleman form: a ``CarlemanSystem`` subclass in ``core/carleman/<form>.py`` + one line in ``FORMS``;
* a window solver: a ``WindowSolver`` subclass (its options, ``solve``, ``gates``) in
  ``core/solvers/<name>.py`` + one line in ``SOLVERS``;
* a readout sign scheme: a ``SignScheme`` subclass in ``core/readout/<name>.py`` + one line in
  ``SIGN_SCHEMES``.

Taylor terms and the window matrix share one operator protocol (``core/operator.py``).
"""
