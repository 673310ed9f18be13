"""Floor 1, the math core: polynomial ODEs, Carleman linearisation, the window system and its solvers,
tomography and the resource ledger.  numpy/scipy/torch tensors only: nothing here knows nn.Module."""
