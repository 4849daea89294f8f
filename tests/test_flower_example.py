"""The example app (examples/flower-peft-sfed): peft + SFedStrategy + a ClientApp, as a user copies it.

In process (a stub grid delivering messages to its ClientApp, each node keeping its context), for
the two schemes that differ on the client (FedIT; FedSA, whose B stays in the client's state), and
once under ``flwr run`` on a local simulation SuperLink with 2 tiny clients.
"""

from __future__ import annotations

import json
import tomllib
import traceback
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("peft")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402

from sfed_theory import scaling_factor  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "examples" / "flower-peft-sfed"


def app_config(**overrides) -> dict:
    """The example's run config (its pyproject's [tool.flwr.app.config], flattened as Flower does)."""
    from flwr.common.config import flatten_dict

    with open(APP / "pyproject.toml", "rb") as f:
        rc = flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    return {**rc, **overrides}


class StubGrid:
    def __init__(self, client_app, n: int, run_config: dict):
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self.app = client_app
        self.contexts = {10 + i: Context(run_id=1, node_id=10 + i, node_config={"partition-id": i, "num-partitions": n},
                                         state=RecordDict(), run_config=run_config) for i in range(n)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            try:
                out.append(self.app(m, self.contexts[m.metadata.dst_node_id]))
            except Exception:
                out.append(Message(Error(code=2, reason=traceback.format_exc()), reply_to=m))
        return out


def check_results(results: dict, rc: dict, n_clients: int) -> None:
    rank, alpha = int(rc["model.lora.rank"]), float(rc["model.lora.alpha"])
    train = {int(r): m for r, m in results["train"].items()}
    assert {float(m["gamma"]) for m in train.values()} == {scaling_factor("sfed", alpha, rank, n_clients)}
    assert all(int(m["n-dropped"]) == 0 for m in train.values())
    last = int(rc["num-server-rounds"])
    assert max(train) == last and train[last]["train-loss"] < train[1]["train-loss"] - 0.05, train
    if rc["strategy.scheme"] != "fedsa":  # FedSA: the server holds A only, each client its own B
        ev = {int(r): m for r, m in results["eval"].items()}
        assert ev[last]["eval-loss"] < ev[0]["eval-loss"] - 0.05, ev  # the federated adapter learned


@pytest.mark.parametrize("scheme", ["fedit", "fedsa"])
def test_example_app_in_process(scheme, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(APP))
    from sfed_peft_example.client_app import app as client_app
    from sfed_peft_example.server_app import app as server_app

    rc = app_config(**{"strategy.scheme": scheme, "out-dir": str(tmp_path)})
    grid = StubGrid(client_app, 2, rc)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    check_results(json.loads((tmp_path / "results.json").read_text()), rc, 2)
    kept = [ctx.state.array_records.get("sfed-fedsa-local-b") for ctx in grid.contexts.values()]
    if scheme == "fedsa":  # each client keeps its own B; the server never saw it
        assert all(k is not None and any(t.numpy().any() for t in k.values()) for k in kept)
    else:
        assert kept == [None, None]


def test_the_two_line_change_as_the_readme_shows_it(tmp_path, monkeypatch):
    """A FlowerTune-style ClientApp with only ``load_round`` swapped in (the reply stays peft's state
    dict) against the example's ServerApp (SFedStrategy in place of FedAvg)."""
    monkeypatch.syspath_prepend(str(APP))
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.clientapp import ClientApp
    from peft import get_peft_model_state_dict

    from sfed_peft_example.dataset import load_partition
    from sfed_peft_example.models import get_model, train_locally
    from sfed_peft_example.server_app import app as server_app
    from sfed_theory.flower_client import load_round

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        rc, pid, n = context.run_config, int(context.node_config["partition-id"]), 2
        model = get_model(rc, n_clients=n)
        load_round(model, msg, context)  # was: set_peft_model_state_dict(model, msg.content["arrays"]...)
        x, y = load_partition(pid, n, int(rc["data.examples"]), int(rc["data.dim"]), int(rc["data.classes"]))
        loss = train_locally(model, x, y, steps=5, lr=0.01, batch_size=32)
        content = RecordDict({"arrays": ArrayRecord(get_peft_model_state_dict(model)),
                              "metrics": MetricRecord({"train-loss": loss, "num-examples": len(y)})})
        return Message(content, reply_to=msg)

    rc = app_config(**{"out-dir": str(tmp_path)})
    server_app(StubGrid(app, 2, rc), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    check_results(json.loads((tmp_path / "results.json").read_text()), rc, 2)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_example_app_under_flwr_run(tmp_path):
    """The example as a user runs it: ``flwr run`` on a (local, simulation) SuperLink, 2 clients."""
    pytest.importorskip("ray")
    from validation.flower_runner import run_app

    rc = {"out-dir": str(tmp_path), "num-server-rounds": 2}
    code, log = run_app(APP, rc, num_supernodes=2, timeout=280)
    assert code == 0 and (tmp_path / "results.json").exists(), log[-3000:]
    check_results(json.loads((tmp_path / "results.json").read_text()), app_config(**rc), 2)
