"""sfed-peft-example: the ClientApp (FlowerTune's shape; the SFed lines are marked)."""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from sfed_peft_example.dataset import load_partition
from sfed_peft_example.models import get_model, train_locally
from sfed_theory.flower_client import load_round, reply_arrays

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the LoRA adapter on this node's data for one round."""
    rc, nc = context.run_config, context.node_config
    pid, n = int(nc["partition-id"]), int(nc["num-partitions"])
    model = get_model(rc, n_clients=n)
    # SFed: the global adapter, the round's gamma as scaling (FedSA: this client's own B); was
    # set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    start = load_round(model, msg, context)
    x, y = load_partition(pid, n, int(rc["data.examples"]), int(rc["data.dim"]), int(rc["data.classes"]),
                          int(rc["seed"]))
    rnd = int(msg.content["config"]["server-round"])
    loss = train_locally(model, x, y, steps=int(rc["train.local-steps"]), lr=float(rc["train.learning-rate"]),
                         batch_size=int(rc["train.batch-size"]), train_a=start.scheme != "ffa", seed=1000 * rnd + pid)
    metrics = MetricRecord({"train-loss": loss, "num-examples": len(y)})
    # SFed: peft's LoRA state dict (FedSA: B stays in context.state); was ArrayRecord(get_peft_model_state_dict(model))
    return Message(RecordDict({"arrays": reply_arrays(model, start, context), "metrics": metrics}), reply_to=msg)
