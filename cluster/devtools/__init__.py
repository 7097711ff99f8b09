"""Test, demo and benchmark tooling, kept out of the control plane: the seeded random checkpoint
generator (checkpoints.py, also what `up` uses for the embedded demo's tiny model) and a synthetic
engine that speaks EngineService without a model (synthetic.py)."""
