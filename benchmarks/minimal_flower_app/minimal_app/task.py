"""minimal-app: the model, the data and the train/test loops."""

import os
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """A small MLP (32 features, 10 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def load_hf_model(path: str):
    """The `flwr new --framework HuggingFace` template's model: a transformers sequence classifier
    (here from a local folder: no Hub), 2 labels, every weight trained and sent."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


WORDS = ("good", "great", "fine", "bad", "awful", "dull", "the", "film", "plot", "acting", "was",
         "really", "not", "quite", "an", "story", "music", "ending", "very", "at", "all")


def load_hf_data(path: str, partition_id: int, examples: int = 400):
    """Synthetic sentences for this partition (the template downloads IMDB; no internet here),
    tokenized as the template does (AutoTokenizer, max 64 tokens, DataCollatorWithPadding)."""
    import random

    from transformers import AutoTokenizer, DataCollatorWithPadding

    rng = random.Random(1000 + partition_id)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(examples)]
    labels = [int(t.count("good") + t.count("great") > t.count("bad") + t.count("awful")) for t in texts]
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(texts, truncation=True, max_length=64)
    rows = [{"input_ids": i, "attention_mask": a, "labels": y}
            for i, a, y in zip(enc["input_ids"], enc["attention_mask"], labels, strict=True)]
    n_train = int(0.8 * examples)
    collate = DataCollatorWithPadding(tok)
    return (DataLoader(rows[:n_train], batch_size=32, shuffle=True, collate_fn=collate),
            DataLoader(rows[n_train:], batch_size=32, collate_fn=collate))


def train_hf(net, trainloader, steps: int, lr: float, device):
    """`steps` AdamW steps over the loader (the template's loop); the mean loss."""
    global LAST_TRAIN_S
    net.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    t0 = time.perf_counter()
    net.train()
    losses = []
    while len(losses) < steps:
        for batch in trainloader:
            optimizer.zero_grad()
            loss = net(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
    LAST_TRAIN_S = time.perf_counter() - t0
    return sum(losses) / len(losses)


def test_hf(net, testloader, device):
    """Loss and accuracy on the test set (the template's evaluation)."""
    net.to(device)
    net.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for batch in testloader:
            out = net(**{k: v.to(device) for k, v in batch.items()})
            loss += out.loss.item()
            correct += (out.logits.argmax(-1) == batch["labels"].to(device)).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)


def load_data(partition_id: int, num_partitions: int, examples: int = 320):
    """This partition's synthetic data (80 % train, 20 % test), seeded by the partition id."""
    g = torch.Generator().manual_seed(1000 + partition_id)
    x = torch.randn(examples, 32, generator=g)
    y = (x[:, :10].argmax(dim=1) + partition_id % 2) % 10
    n_train = int(0.8 * examples)
    trainloader = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=32, shuffle=True)
    testloader = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=32)
    return trainloader, testloader


#: seconds of the last ``train`` call's loop (after the optimizer is built, as fedlora times it)
LAST_TRAIN_S = 0.0


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set; the mean training loss."""
    global LAST_TRAIN_S
    net.to(device)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    t0 = time.perf_counter()
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for x, y in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    LAST_TRAIN_S = time.perf_counter() - t0
    return running_loss / (epochs * len(trainloader))


def test(net, testloader, device):
    """Loss and accuracy on the test set."""
    net.to(device)
    criterion = nn.CrossEntropyLoss()
    net.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for x, y in testloader:
            out = net(x.to(device))
            loss += criterion(out, y.to(device)).item()
            correct += (out.argmax(1) == y.to(device)).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)


def trace(event: str, partition_id: int, value: float = 0.0) -> None:
    """Benchmarks only: append ``event time pid partition value`` to $FEDLORA_TRACE_DIR/trace-<pid>
    (``value``: the process's age at ``train-recv``, the local training's seconds at ``train-done``)."""
    d = os.environ.get("FEDLORA_TRACE_DIR")
    if d:
        with open(os.path.join(d, f"trace-{os.getpid()}"), "a") as f:
            f.write(f"{event} {time.time():.6f} {os.getpid()} {partition_id} {value:.6f}\n")


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return time.time() - (btime + start_ticks / os.sysconf("SC_CLK_TCK"))
