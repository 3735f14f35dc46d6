"""The Optuna search over theta's settings. Modules, bottom to top (each imports only those below it):
options (what the user asks) -> space (search space) -> trials (factor cache, scorer, trial runner)
and storage (storage URL, dead workers) -> outputs (files, from an OptimizeReport) -> study (the lifecycle).
Imports: Optuna and every layer below (`measure`, `runtime`, `theta`, `formats`, `util`, `errors`)."""
