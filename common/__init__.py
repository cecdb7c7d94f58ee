"""Infrastructure shared by both stages (config base, checkpoints, files, weights, seeds, ...); imports no stage."""
