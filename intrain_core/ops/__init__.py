"""Integer ops, one file per family; each mirrors the torch function of the same name."""
