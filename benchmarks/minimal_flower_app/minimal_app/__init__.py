"""minimal-app: Flower's minimal PyTorch app (the `flwr new` layout), a benchmark baseline."""
