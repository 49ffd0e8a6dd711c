"""What every task family's run shares: the user-error type, config schemas, device choice,
the run directory, the coverage step and the non-finite step policy."""
