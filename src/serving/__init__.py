"""Using a trained run: its MLflow pyfunc model (logged by `export`, loaded as `model.TrainedModel`)."""
