"""The coordinator: plans which peer serves which blocks. An optimisation, never a single point of failure."""
