"""MLflow tracking: the driver's record of runs, sweeps and seeds."""
