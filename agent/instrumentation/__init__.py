"""One module per instrumented library; each declares its ``PATCHES`` for the registry."""
