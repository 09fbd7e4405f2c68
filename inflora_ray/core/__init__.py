"""The method, in pure PyTorch: the adapted layer, the subspace and DualGPM memory, the methods, the model and
the metrics. Nothing here imports Ray or MLflow."""
