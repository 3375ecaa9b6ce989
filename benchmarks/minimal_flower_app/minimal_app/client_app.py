"""minimal-app: the ClientApp (train and evaluate handlers)."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from minimal_app import task
from minimal_app.task import Net, load_data, process_age_s, trace
from minimal_app.task import test as test_fn
from minimal_app.task import train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    """Train the received model on this node's data; reply with the weights and metrics."""
    partition_id = context.node_config["partition-id"]
    trace("train-recv", partition_id, process_age_s())
    hf_path = context.run_config.get("model-path", "")
    model = task.load_hf_model(hf_path) if hf_path else Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if hf_path:
        trainloader, _ = task.load_hf_data(hf_path, partition_id)
        train_loss = task.train_hf(model, trainloader, context.run_config["local-steps"],
                                   msg.content["config"]["lr"], device)
    else:
        trainloader, _ = load_data(partition_id, context.node_config["num-partitions"])
        train_loss = train_fn(model, trainloader, context.run_config["local-epochs"],
                              msg.content["config"]["lr"], device)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train_loss": train_loss,
                                                   "num-examples": len(trainloader.dataset)})})
    trace("train-done", partition_id, task.LAST_TRAIN_S)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    """Evaluate the received model on this node's test split."""
    hf_path = context.run_config.get("model-path", "")
    model = task.load_hf_model(hf_path) if hf_path else Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if hf_path:
        _, testloader = task.load_hf_data(hf_path, context.node_config["partition-id"])
        loss, acc = task.test_hf(model, testloader, device)
    else:
        _, testloader = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
        loss, acc = test_fn(model, testloader, device)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(testloader.dataset)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
