"""Using a trained model: load a run folder, generate."""
