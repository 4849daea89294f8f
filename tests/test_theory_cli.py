"""The sfed-theory command line."""

from __future__ import annotations

import re

import pytest

from sfed_theory.cli import main


def test_table_answers_the_16_clients_rank_256_question(capsys):
    assert main(["table", "--alpha", "16", "--rank", "256", "--clients", "16"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()[2:]}
    assert rows == pytest.approx({"lora": 0.0625, "rslora": 1.0, "sfed": 4.0, "sfed-general": 4.0})


def test_table_general_rule_uses_rho_and_participation(capsys):
    assert main(["table", "--alpha", "16", "--rank", "256", "--clients", "16", "--rho", "0.1",
                 "--participating", "4"]) == 0
    out = capsys.readouterr().out
    general = float([ln for ln in out.splitlines() if ln.startswith("sfed-general")][0].split()[1])
    assert general == pytest.approx(16 / (256 * (0.1 + 0.9 / 4)) ** 0.5, rel=1e-5)


def test_derive_prints_closed_forms_and_steps(capsys):
    assert main(["derive", "--scheme", "ffa", "--regime", "adam", "--quantity", "adapter_output"]) == 0
    assert "X2*c_N*d*gamma**2*r*s_A**2*s_B**2" in capsys.readouterr().out
    assert main(["derive", "--scheme", "fedit", "--regime", "adam", "--quantity", "aggregation_error",
                 "--steps", "--latex"]) == 0
    out = capsys.readouterr().out
    assert r"\langle" in out and r"\mathbb{E}[Q]" in out and r"\delta_" in out


def test_solve_prints_reductions(capsys):
    assert main(["solve", "--scheme", "ffa", "--regime", "adam"]) == 0
    out = capsys.readouterr().out
    assert "sqrt(N)*alpha/sqrt(r)" in out and "alpha/sqrt(r)" in out


def test_check_runs_and_reports_agreement(capsys):
    assert main(["check", "--scheme", "fedit", "--regime", "adam", "--samples", "5000"]) == 0
    assert "0 disagreement(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["table", "--alpha", "16", "--rank", "0", "--clients", "4"], "integer >= 1"),
        (["table", "--alpha", "x", "--rank", "8", "--clients", "4"], "number > 0"),
        (["table", "--alpha", "16", "--rank", "8", "--clients", "4", "--rho", "2"], r"\[0, 1\]"),
        (["table", "--alpha", "16", "--rank", "8", "--clients", "4", "--participating", "5"], "exceeds"),
        (["table", "--alpha", "16", "--rank", "8", "--clients", "2", "--weights", "1,2,3"], "weights has 3"),
        (["derive", "--scheme", "fedavg"], "invalid choice"),
        (["derive", "--scheme", "ffa", "--regime", "adam", "--quantity", "loss_change"], "sgd"),
        ([], "required"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert re.search(match, capsys.readouterr().err)
