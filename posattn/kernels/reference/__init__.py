"""Pure-torch oracles of every op: fp64, any device, written for clarity."""
