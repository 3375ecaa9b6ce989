"""minimal-app: the ServerApp (FedAvg over the ClientApps)."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from minimal_app.task import Net, load_hf_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg for `num-server-rounds` rounds from a fresh Net (or the transformers model at
    `model-path`)."""
    torch.manual_seed(0)
    hf_path = context.run_config.get("model-path", "")
    arrays = ArrayRecord((load_hf_model(hf_path) if hf_path else Net()).state_dict())
    strategy = FedAvg(fraction_train=context.run_config["fraction-train"])
    strategy.start(grid=grid, initial_arrays=arrays,
                   train_config=ConfigRecord({"lr": context.run_config["lr"]}),
                   num_rounds=context.run_config["num-server-rounds"])
