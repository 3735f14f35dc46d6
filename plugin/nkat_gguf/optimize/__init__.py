"""The Optuna search over theta's settings: search space, trials, storage, study, outputs.
Imports: Optuna and every layer below (`measure`, `runtime`, `theta`, `formats`, `util`, `errors`)."""
