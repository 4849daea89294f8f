"""sfed-peft-example: the ServerApp (FlowerTune's shape; the SFed lines are marked)."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from peft import get_peft_model_state_dict

from sfed_peft_example.dataset import load_eval
from sfed_peft_example.models import evaluate, get_model
from sfed_theory.flower import SFedStrategy
from sfed_theory.flower_client import load_adapter

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of federated LoRA with SFed's gamma."""
    rc = context.run_config
    n_nodes = len(list(grid.get_node_ids())) or int(rc["strategy.min-train-nodes"])
    arrays = ArrayRecord(get_peft_model_state_dict(get_model(rc, n_clients=n_nodes)))
    # SFed: was FedAvg(fraction_train=..., fraction_evaluate=0.0, min_train_nodes=...)
    strategy = SFedStrategy(alpha=float(rc["model.lora.alpha"]), rule=str(rc["strategy.rule"]),
                            scheme=str(rc["strategy.scheme"]), fraction_train=float(rc["strategy.fraction-train"]),
                            fraction_evaluate=0.0, min_train_nodes=int(rc["strategy.min-train-nodes"]),
                            min_available_nodes=int(rc["strategy.min-train-nodes"]))
    model = get_model(rc, n_clients=n_nodes)
    x, y = load_eval(int(rc["data.examples"]), int(rc["data.dim"]), int(rc["data.classes"]), int(rc["seed"]))

    def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        # the global adapter at the strategy's gamma (FedSA: the server holds A only; B is on the clients)
        load_adapter(model, arrays, strategy.gamma or 1.0)
        loss, acc = evaluate(model, x, y)
        return MetricRecord({"eval-loss": loss, "eval-acc": acc})

    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=int(rc["num-server-rounds"]),
                            evaluate_fn=central_eval)
    if rc.get("out-dir"):
        out = {"train": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
               "eval": {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()}}
        Path(str(rc["out-dir"])).mkdir(parents=True, exist_ok=True)
        (Path(str(rc["out-dir"])) / "results.json").write_text(json.dumps(out, indent=1))
