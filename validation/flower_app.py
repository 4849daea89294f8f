"""The federated LoRA validation run on Flower: the app's entry points, in one place.

The same experiment as :func:`validation.federated.run` (one :class:`~validation.config.RunConfig`
in, the same tidy rows out, ``backend = "flower"``), with the clients as Flower ``ClientApp`` s on
(virtual or real) SuperNodes and the server as :class:`sfed_theory.flower.SFedStrategy` driving
Flower's own round loop. One module per job:

* :mod:`validation.flower_server`: the ServerApp, :class:`~validation.flower_server.HarnessStrategy`
  (SFedStrategy with the harness's sampling) and :func:`~validation.flower_server.run_on_grid`;
* :mod:`validation.flower_record`: the measurement of each round (rows, events, states);
* :mod:`validation.flower_client`: the ClientApp (peft LoRA training, FedSA's B in the client's
  state, fault injection as a mod);
* :mod:`validation.flower_runner`: ``flwr run`` on a local simulation SuperLink (one start-up per
  grid), the comparison with the in-process harness, and the ``sfed-flower`` command.

``server_app`` and ``client_app`` are the components of the app bundle ``flower/pyproject.toml``.
"""

from __future__ import annotations

from validation.flower_client import (ERR_DIVERGED, FAULTS, ClientDropout, client_app, decode_adapter, encode_adapter,
                                      faults_run_config, inject_faults)
from validation.flower_record import EVENT_COLUMNS, EXTRA_COLUMNS, FlowerRun, copy_state, state_tensors
from validation.flower_runner import SimulationResult, compare, compare_states, compare_summary, main, simulate
from validation.flower_server import (HarnessStrategy, configs_from_run_config, discover_clients, events_path,
                                      make_server_app, read_states, run_on_grid, server_app, states_path,
                                      write_flower_run)

__all__ = ["client_app", "server_app", "make_server_app", "run_on_grid", "simulate", "compare", "compare_summary",
           "compare_states", "main", "HarnessStrategy", "FlowerRun", "SimulationResult", "configs_from_run_config",
           "discover_clients", "write_flower_run", "events_path", "states_path", "read_states", "encode_adapter",
           "decode_adapter", "faults_run_config", "inject_faults", "copy_state", "state_tensors", "EXTRA_COLUMNS",
           "EVENT_COLUMNS", "FAULTS", "ERR_DIVERGED", "ClientDropout"]

if __name__ == "__main__":
    raise SystemExit(main())
