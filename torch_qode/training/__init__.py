"""Floor 3, training: the QODE optimizer, its window core and the dissipation monitor."""
