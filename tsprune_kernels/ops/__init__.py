"""One file per op: validation, custom-op registration, autograd and backend dispatch."""
