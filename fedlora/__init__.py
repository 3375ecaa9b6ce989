"""fedlora: federated LoRA fine-tuning with exact aggregation strategies on Flower."""

__version__ = "0.1.0"
