"""Policy search: tune a trained model's sampling knobs (config.sample) against a metric, for any family.

`finite_difference`: AutoNAT's optimiser (one-sided finite differences per parameter, SGD with momentum, per-group
deltas / learning rates / clamps), as a resumable state machine. `metrics`: what it minimises. `runner`:
`--mode=search` (fixed evaluation seeds, one compiled sampler for every evaluation, the state checkpointed after each
evaluation, the best policy written as an override file that `--overrides` applies).
"""
