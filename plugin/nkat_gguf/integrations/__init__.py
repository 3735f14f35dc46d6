"""Other programs that run NKAT models. Imports: `errors`, `util`, `formats`, `runtime`."""
