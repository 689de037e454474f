"""Which device a bundle fits, and how fast: model analysis, device profiles, a roofline planner and
benchmarks. Torch-free (DESIGN.md rule 1): it reads bundles, never checkpoints."""
