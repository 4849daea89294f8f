"""paper_figures: every figure is written from the committed results, missing results fail clearly,
the committed results are the tidy, small, documented set the figures claim, and the numbers the
figures plot come from the data and the theory API."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("pyarrow")

from paper_figures import convergence_figs, empirical_figs, experiments, make_figures, theory_figs  # noqa: E402

import sfed_theory  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- all figures, CLI


@pytest.mark.slow
@pytest.mark.timeout(1200)  # about 450 s on 2 quiet cores (the bootstrap slope figures h, i, k, u take most)
def test_cli_writes_every_expected_file_from_committed_results(tmp_path, capsys):
    out = tmp_path / "figs"
    code = make_figures.main(["--out", str(out), "--results", str(RESULTS)])
    assert code == 0, capsys.readouterr().err
    expected = make_figures.expected_files(out)
    keys = [f.key for f in make_figures.FIGURES]
    assert keys == ["main", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s", "t", "u", "v", "w", "x"]
    assert len(expected) == 2 * len(keys) == 50  # main + (a)..(x), PNG and PDF
    assert {p.name for p in expected} >= {"fig_convergence.png", "fig_convergence.pdf", "fig_normcheck.png",
                                          "fig_normcheck.pdf", "fig_lr_transfer.png", "fig_hetero_lr.pdf"}
    written = sorted(out.iterdir())
    assert sorted(expected) == written, f"unexpected set of files: {[p.name for p in written]}"
    for p in expected:
        data = p.read_bytes()
        assert len(data) > 5_000, f"{p.name} is suspiciously small ({len(data)} bytes)"
        if p.suffix == ".png":
            assert data.startswith(PNG_MAGIC), f"{p.name} is not a PNG"
        else:
            assert data.startswith(b"%PDF"), f"{p.name} is not a PDF"
    printed = capsys.readouterr().out
    for fig in make_figures.FIGURES:
        assert f"({fig.key})" in printed, f"no progress line for figure {fig.key}"


def test_figures_of_one_build_share_one_refined_fit(tmp_path, monkeypatch):
    calls = []  # an empty fit (no refined lines) is enough to count the calls
    monkeypatch.setattr(empirical_figs, "refined_params",
                        lambda df, rnd=1, stored=None, pilot=None: calls.append((len(df), stored, len(pilot))) or {})
    make_figures.build(tmp_path, RESULTS, keys=["main", "a", "b", "d"], formats=("png",), verbose=False)
    check, two = experiments.load("gradient_check", RESULTS), experiments.load("gradient_check_two_clients", RESULTS)
    pilot_rows = len(check) + int(two.lr.isin(check.lr.unique()).sum())
    coherent = len(experiments.load(make_figures.REFINED_PILOT, RESULTS))
    # the N = 2 runs at the check's learning rate join the pilot; the exponent table's stored fit of the README's
    # model (two vectors, measured curvature) is offered, with the pilot rerun that measured its inputs
    assert calls == [(pilot_rows, RESULTS / "gradient_check_two_vectors_measured_curvature_refined_params.csv",
                      coherent)]


def test_figures_without_the_pilot_rerun_fall_back_to_one_vector(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(empirical_figs, "refined_params",
                        lambda df, rnd=1, stored=None, pilot=None: calls.append((stored.name, pilot)) or {})
    folder = tmp_path / "results"
    folder.mkdir()
    for name in ("gradient_check", "gradient_check_two_clients"):
        path = experiments.results_path(name, RESULTS)
        (folder / path.name).symlink_to(path)
    make_figures.build(tmp_path / "figs", folder, keys=["d"], formats=("png",), verbose=False)
    assert calls == [("gradient_check_refined_params.csv", None)]


def test_committed_main_figure_for_readme_exists():
    p = make_figures.DOCS_COPY
    assert p.is_file(), f"{p} missing; run `sfed-figures --update-docs`"
    assert p.read_bytes().startswith(PNG_MAGIC)


# ----------------------------------------------------------------------------- missing results


def test_missing_results_fail_clearly_before_drawing(tmp_path, capsys):
    out = tmp_path / "figs"
    empty = tmp_path / "no_results"
    empty.mkdir()
    with pytest.raises(experiments.MissingResults, match=r"gradient_check\.parquet"):
        make_figures.build(out, empty, keys=["a"])
    assert not out.exists() or not any(out.iterdir()), "nothing may be drawn when results are missing"
    code = make_figures.main(["--out", str(out), "--results", str(empty), "--only", "d"])
    err = capsys.readouterr().err
    assert code == 1
    assert "gradient_check.parquet" in err and "--rerun" in err


def test_each_experiment_file_is_required_by_its_figures(tmp_path):
    only_scaling = tmp_path / "partial"
    only_scaling.mkdir()
    shutil.copy(experiments.results_path("scaling", RESULTS), only_scaling)
    with pytest.raises(experiments.MissingResults, match=r"curves\.parquet"):
        make_figures.build(tmp_path / "figs", only_scaling, keys=["c"])
    for key, exp in (("g", "convergence"), ("h", "normcheck")):
        with pytest.raises(experiments.MissingResults, match=rf"{exp}\.parquet.*--rerun --experiments {exp}"):
            make_figures.build(tmp_path / "figs", only_scaling, keys=[key])
    shutil.copy(experiments.results_path("gradient_check_heldout", RESULTS), only_scaling)  # (n) reads two
    with pytest.raises(experiments.MissingResults, match=r"gradient_check\.parquet"):
        make_figures.build(tmp_path / "figs", only_scaling, keys=["n"])
    assert not (tmp_path / "figs").exists()


def test_every_figure_names_an_experiment_with_committed_results():
    for fig in make_figures.FIGURES:
        assert fig.experiment is None or fig.experiment in experiments.EXPERIMENTS, fig
        if fig.experiment:
            assert experiments.results_path(fig.experiment, RESULTS).is_file(), fig
    # every experiment feeds a figure, except scaling (the default grid's results, read by notebook 03)
    fed = {e for f in make_figures.FIGURES for e in f.needs}
    assert fed == set(experiments.EXPERIMENTS) - {"scaling"}
    assert 'load("scaling"' in (ROOT / "notebooks" / "03_validation_results.py").read_text()


def test_empty_results_file_is_an_error(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    pd.read_parquet(experiments.results_path("curves", RESULTS)).iloc[:0].to_parquet(d / "curves.parquet")
    with pytest.raises(experiments.MissingResults, match="no rows"):
        experiments.load("curves", d)


def test_unknown_figure_key_is_rejected(tmp_path, capsys):
    assert make_figures.main(["--out", str(tmp_path), "--only", "z"]) == 2
    assert "unknown figure" in capsys.readouterr().err


def test_results_missing_a_column_are_rejected():
    df = experiments.load("scaling", RESULTS).drop(columns=["grad_A_end"])
    with pytest.raises(ValueError, match="grad_A_end"):
        empirical_figs.round_rows(df)


# ----------------------------------------------------------------------------- committed results


@pytest.mark.parametrize("experiment", experiments.GRID_EXPERIMENTS)
def test_committed_results_are_small_tidy_and_match_their_grid(experiment):
    path = experiments.results_path(experiment, RESULTS)
    assert path.is_file(), f"committed results {path} missing"
    assert path.stat().st_size < 400_000, f"{path} is {path.stat().st_size} bytes; keep the committed set small"
    df = experiments.load(experiment, RESULTS)
    empirical_figs.check_columns(df)
    # tidy: exactly one row per run x round x layer, config and version on every row
    assert not df.duplicated(["run_id", "round", "layer"]).any()
    for col in ("version", "model", "dataset", "n_clients", "rank", "rule", "scheme", "optimizer", "seed",
                "lr", "local_steps", "rounds"):
        assert col in df.columns and df[col].notna().all(), col
    assert (df["version"] == sfed_theory.__version__).all()
    assert {"inc_A_rms", "inc_B_rms"} <= set(df.columns), "results predate the harness's increment scales"
    if experiment == "scaling":  # the exponent CIs resample seeds x layers
        assert df["seed"].nunique() >= 2, "CIs need seeds x layers"
    assert not df["diverged"].astype(bool).any(), "a committed run diverged; the figures exclude it silently"
    # every cell of the grid file is there, with the grid's base settings
    grid = experiments.load_grid(experiment, "cpu")
    cells = grid.runs()
    keys = ["n_clients", "rank", "rule", "scheme", "optimizer", "seed"]
    stored = {tuple(r) for r in df[keys].drop_duplicates().itertuples(index=False)}
    wanted = {tuple(getattr(c, k) for k in keys) for c in cells}
    assert stored == wanted
    base = grid.base.to_dict()
    for field in ("model", "dataset", "lr", "local_steps", "batch_size", "rounds", "max_length", "alpha",
                  "partition", "dirichlet_alpha"):
        assert (df[field] == base[field]).all(), field
    n_rounds = df.groupby("run_id")["round"].nunique()
    assert (n_rounds == base["rounds"]).all()


def test_manifest_records_grid_versions_and_machine():
    m = experiments.load_manifest(RESULTS)
    assert set(experiments.GRID_EXPERIMENTS) <= set(m)
    for exp in experiments.GRID_EXPERIMENTS:
        entry = m[exp]
        assert entry["runs_stored"] == entry["runs_in_grid"] > 0
        assert entry["versions"]["sfed_theory"] == sfed_theory.__version__
        assert "torch" in entry["versions"] and entry["machine"]["cpu_count"] >= 1
        assert len(entry["git"]["commit"]) == 40
        # the harness that produced the results is pinned: a commit, byte-identical sources
        pin = entry["harness"]
        assert len(pin["commit"]) == 40 and pin["clean"] is True and pin["modified"] == []
        assert len(pin["sha256"]["validation"]) == 64 == len(entry["source_sha256"]["sfed_theory"])
        on_disk = json.loads((ROOT / entry["grid_file"]).read_text())
        on_disk = {k: v for k, v in on_disk.items() if not k.startswith("_")}
        assert {k: v for k, v in entry["grid"].items() if k != "base"} == \
            {k: v for k, v in on_disk.items() if k != "base"}


@pytest.mark.parametrize("experiment", ["convergence", "normcheck"])
def test_committed_results_with_extra_axes_are_complete_and_pinned(experiment):
    """convergence / normcheck (grids with splits, oracle rho, N = 1 dedupe): every run of the grid is
    stored, with its provenance in the one manifest."""
    df = experiments.load(experiment, RESULTS)
    path = experiments.results_path(experiment, RESULTS)
    assert path.stat().st_size < 1_000_000, f"{path} is {path.stat().st_size} bytes; keep the committed set small"
    man = experiments.load_manifest(RESULTS)[experiment]
    assert man["file"] == path.name and man["grid_file"] == f"paper_figures/grids/cpu_{experiment}.json"
    assert man["runs_found"] == man["runs_expected"] == df["run_id"].nunique() > 0
    assert len(man["git"]["commit"]) == 40 and man["git"]["harness_clean"] is True
    s = experiments.spec(experiment, "cpu")
    assert set(df["partition"]) == set(s.partitions)
    assert set(df["rule"]) == set(s.grid.rules) and set(df["rank"]) == set(s.grid.ranks)
    assert (df.groupby("run_id")["round"].nunique() == s.grid.base.rounds).all()
    # the spec's cells are exactly the stored runs (the oracle rho is cached in the stored manifest)
    oracle = {k: v for k, v in (man["oracle_rho"] or {}).items() if not k.endswith("/pilot")}
    ids = {c.run_id for c in s.runs(_oracle_folder(oracle))}
    assert ids == set(df["run_id"])
    with pytest.raises(ValueError, match="extra axes"):
        experiments.load_grid(experiment, "cpu")


@pytest.mark.parametrize("experiment", ["gradient_check", "gradient_check_sgd", "gradient_check_heldout",
                                        "gradient_check_small_lr", "lr_transfer", "hetero_lr"])
def test_committed_results_of_the_spec_runner_are_complete_and_pinned(experiment):
    """Results stored by the one runner: every cell of the grid file, the harness commit they were made
    with (clean), the wall time, and nothing else."""
    df = experiments.load(experiment, RESULTS)
    man = experiments.load_manifest(RESULTS)[experiment]
    s = experiments.spec(experiment, "cpu")
    assert set(df["run_id"]) == {c.run_id for c in s.runs()}
    assert man["runs_stored"] == man["runs_in_grid"] == df["run_id"].nunique()
    assert len(man["harness"]["commit"]) == 40 and man["harness"]["clean"] is True
    assert all(len(p["commit"]) == 40 and p["clean"] is True for p in man["harness"].get("added_with", []))
    assert man["wall_s_this_call"] and man["wall_s_this_call"] > 0
    assert not df.duplicated(["run_id", "round", "layer"]).any()
    assert (df.groupby("run_id")["round"].nunique() == s.grid.base.rounds).all()


def _oracle_folder(oracle: dict) -> Path:
    import tempfile

    d = Path(tempfile.mkdtemp())
    (d / "oracle_rho.json").write_text(json.dumps(oracle))
    return d


def test_rerun_runs_every_experiment_through_one_runner(tmp_path, monkeypatch):
    """--rerun --experiments normcheck runs its cells, then collects, in a work folder keyed by the
    harness digest; an unknown grid set or a missing grid file is an error before anything runs."""
    calls = []
    monkeypatch.setattr(experiments, "run_experiment",
                        lambda exp, gs, work, **kw: calls.append(("run", exp, gs, Path(work))) or
                        {"wall_s": 0.0, "failed": {}})

    def fake_collect(exp, gs, work, results, **kw):
        calls.append(("collect", exp, gs, Path(work)))
        return Path(results) / f"{exp}.parquet"

    monkeypatch.setattr(experiments, "collect", fake_collect)
    out = experiments.rerun(tmp_path / "res", experiments=("normcheck",), work_dir=tmp_path / "work",
                            allow_dirty=True, progress=False)
    assert out == {"normcheck": tmp_path / "res" / "normcheck.parquet"}
    assert [c[:3] for c in calls] == [("run", "normcheck", "cpu"), ("collect", "normcheck", "cpu")]
    work = calls[0][3]
    assert work == calls[1][3] and work.name == "cpu_normcheck" and work.parent.name.startswith("harness-")
    with pytest.raises(ValueError, match="no gpu grid"):
        experiments.rerun(tmp_path / "res", grid_set="gpu", experiments=("normcheck",),
                          work_dir=tmp_path / "work", allow_dirty=True)
    with pytest.raises(ValueError, match="unknown grid set"):
        experiments.rerun(tmp_path / "res", grid_set="tpu", experiments=("normcheck",), allow_dirty=True)


def test_no_import_cycles_in_paper_figures():
    """experiments/specs/provenance never import the figure modules (the figures read results only)."""
    import ast

    for mod in ("experiments", "specs", "provenance"):
        tree = ast.parse((ROOT / "paper_figures" / f"{mod}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in imported if m and m.endswith("_figs")}, (mod, imported)


# ----------------------------------------------------------------------------- numbers come from data/theory


def _fake_results(scale: float) -> pd.DataFrame:
    """__all__ rows whose measured norms are exactly `scale` x the theory (rho_hat = 0.1)."""
    rows = []
    for rule in ("lora", "rslora", "sfed"):
        for r in (2, 8, 32):
            for n in (1, 4):
                rec = {"run_id": f"{rule}{r}{n}", "layer": "__all__", "round": 1, "rule": rule, "rank": r,
                       "n_clients": n, "n_participating": n, "scheme": "ffa", "optimizer": "adamw", "alpha": 16.0,
                       "d_out": 32, "k_in": 24, "rho_hat": 0.1 if n > 1 else float("nan"), "diverged": False,
                       "train_loss": 1.0, "eval_acc": 0.5}
                rec["inc_A_rms"], rec["inc_B_rms"] = 0.0, 1e-3 * (1 + r / 64 + n / 8)  # FFA: A not trained
                sc = empirical_figs.theory_scales(24, "adamw", rec["inc_A_rms"], rec["inc_B_rms"])
                for q, (col, _) in empirical_figs.QUANTITIES.items():
                    rec[col] = scale * sfed_theory.predicted_norm(q, rule, rank=r, n_clients=n, d=32, k=24,
                                                                  rho=0.1 if n > 1 else 0.0, **sc)
                rows.append(rec)
    return pd.DataFrame(rows)


def test_fitted_scale_recovers_a_known_constant_and_zero_residual():
    pred = empirical_figs.with_predictions(_fake_results(3.7))
    scales = empirical_figs.fit_scales(pred, "rhohat")
    for q, s in scales.items():
        assert s == pytest.approx(3.7, rel=1e-9), q
    col = empirical_figs.QUANTITIES["grad_A"][0]
    assert np.allclose(pred[col], 3.7 * pred["pred_grad_A_rhohat"])
    # at rho = 0 the theory is wrong for these data, so one constant cannot make the residual vanish
    s0 = empirical_figs.fit_scales(pred, "rho0")["adapter_output"]
    resid = np.log(pred["adapter_rms"] / (s0 * pred["pred_adapter_output_rho0"]))
    assert np.abs(resid).max() > 0.05


def test_predictions_use_the_measured_increment_scale():
    # under Adam s_B is the measured inc_B_rms: doubling it doubles the FFA update prediction
    a = _fake_results(1.0)
    b = a.assign(inc_B_rms=2 * a["inc_B_rms"])
    pa, pb = empirical_figs.with_predictions(a), empirical_figs.with_predictions(b)
    assert np.allclose(pb["pred_update_fro_rhohat"], 2 * pa["pred_update_fro_rhohat"])
    assert empirical_figs.theory_scales(384, "adamw") == {"s_A": pytest.approx(1 / math.sqrt(3 * 384))}
    assert "s_B" not in empirical_figs.theory_scales(384, "sgd", 0.1, 0.1)  # SGD: eta, tau instead


def test_round_rows_take_the_rms_over_seeds_and_drop_diverged_runs():
    a = _fake_results(1.0)
    b = a.copy()
    b["run_id"] += "s1"
    b["grad_A_end"] *= 3.0
    c = a.copy()
    c["run_id"] += "bad"
    c["grad_A_end"] = 1e6
    c["diverged"] = True
    a["seed"], b["seed"], c["seed"] = 0, 1, 2
    rows = empirical_figs.round_rows(pd.concat([a, b, c]))
    assert len(rows) == len(a)
    merged = rows.merge(a, on=["rule", "rank", "n_participating"], suffixes=("", "_a"))
    assert np.allclose(merged["grad_A_end"], np.sqrt((1 + 9) / 2) * merged["grad_A_end_a"])  # RMS of x1 and x3
    assert np.allclose(merged["grad_A_end_lo"], merged["grad_A_end_a"])  # seed range, diverged run left out
    assert np.allclose(merged["grad_A_end_hi"], 3.0 * merged["grad_A_end_a"])
    assert (rows["n_seeds"] == 2).all()


def test_theory_heatmap_values_come_from_predicted_norm():
    # SFed keeps the Adam-regime moment at the target (ratio 1) at rho = 0; LoRA falls as 1/(r N)
    g = theory_figs.moment_grid("sfed", np.array([1, 4, 64]), np.array([1, 8, 32]))
    assert np.allclose(g, 1.0)
    lo = theory_figs.moment_grid("lora", np.array([1, 4, 64]), np.array([1, 8]))
    assert np.allclose(lo, 1.0 / np.outer([1, 8], [1, 4, 64]))
    # and not a typed-in law: with rho > 0 SFed overshoots by N * c_N
    n, rho = 16, 0.2
    assert theory_figs.moment_ratio("sfed", 8, n, rho=rho) == pytest.approx(n * (rho + (1 - rho) / n))


def test_solved_gamma_matches_the_general_rule():
    f = theory_figs.gamma_star_fn("adam")
    for r, n, rho in [(1, 1, 0.0), (8, 4, 0.3), (256, 32, 0.05), (64, 16, 1.0)]:
        assert f(16.0, r, n, rho, 384) == pytest.approx(
            sfed_theory.scaling_factor("sfed-general", 16.0, r, n, rho=rho), rel=1e-12)
    g = theory_figs.gamma_star_fn("sgd")
    ratio = g(16.0, 64, 16, 0.0, 384) / g(16.0, 64, 1, 0.0, 384)
    assert ratio == pytest.approx(16 ** 0.25)  # SGD: N^(1/4), not sqrt(N)
    assert not math.isclose(ratio, 4.0)


def test_grid_files_are_valid_and_gpu_grid_is_larger(tmp_path):
    gpu_grids = [e for e in experiments.EXPERIMENTS if experiments.grid_file(e, "gpu").is_file()]
    assert set(experiments.GRID_EXPERIMENTS) | {"convergence", "lr_transfer"} <= set(gpu_grids)
    for exp in gpu_grids:
        # counted without the oracle's pilot runs (they would run here, on a device this machine may lack)
        cpu = dataclasses.replace(experiments.spec(exp, "cpu"), oracle={}).runs(tmp_path)
        gpu = dataclasses.replace(experiments.spec(exp, "gpu"), oracle={}).runs(tmp_path)
        assert len(gpu) > len(cpu)
        assert all(c.device == "cuda" for c in gpu) and all(c.device == "cpu" for c in cpu)


# ----------------------------------------------------------------------------- --rerun path


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rerun_stores_results_and_manifest_then_draws(tmp_path, capsys):
    """--rerun end to end on the harness's fast synthetic task (the CPU grid's cells, 2 rounds)."""
    pytest.importorskip("torch")
    res, work, figs = tmp_path / "res", tmp_path / "work", tmp_path / "figs"
    code = make_figures.main(["--rerun", "--allow-dirty", "--experiments", "curves", "--results", str(res),
                              "--work-dir", str(work),
                              "--set", "model=synthetic", "dataset=synthetic", "rounds=2",
                              "--only", "c", "--formats", "png", "--out", str(figs)])
    assert code == 0, capsys.readouterr().err
    df = experiments.load("curves", res)
    assert set(df["model"]) == {"synthetic"} and set(df["round"]) == {1, 2}
    assert df["run_id"].nunique() == len(experiments.load_grid("curves", "cpu").runs())
    m = experiments.load_manifest(res)["curves"]
    assert m["grid"]["base"]["model"] == "synthetic" and m["runs_stored"] == m["runs_in_grid"]
    assert len(m["source_sha256"]["validation"]) == 64
    assert len(m["harness"]["commit"]) == 40 and isinstance(m["harness"]["clean"], bool)
    # per-run files live under the harness digest: a resume never reuses runs of other harness code
    assert Path(m["work_folder"]).parent.name.startswith("harness-") and Path(m["work_folder"]).is_dir()
    assert (figs / "fig_c_loss_curves.png").stat().st_size > 5_000
    # a second call resumes: every cell is already finished, the stored file is rewritten unchanged
    before = df.sort_values(["run_id", "round", "layer"]).reset_index(drop=True)
    experiments.rerun(res, experiments=("curves",), work_dir=work, progress=False, allow_dirty=True,
                      model="synthetic", dataset="synthetic", rounds=2)
    after = experiments.load("curves", res).sort_values(["run_id", "round", "layer"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)


def test_runs_added_by_a_later_harness_are_named_in_the_folder_pin(tmp_path):
    first = {"commit": "a" * 40, "clean": True, "modified": [], "sha256": {"validation": "1", "sfed_theory": "2"}}
    later = {"commit": "b" * 40, "clean": True, "modified": [], "sha256": {"validation": "3", "sfed_theory": "2"}}
    (tmp_path / "harness.json").write_text(json.dumps(first))
    experiments._record_later_pin(tmp_path, later)
    experiments._record_later_pin(tmp_path, later)  # recorded once
    pin = json.loads((tmp_path / "harness.json").read_text())
    assert pin["commit"] == first["commit"] and pin["added_with"] == [later]
    experiments._record_later_pin(tmp_path, {**first, "commit": "c" * 40})  # same code: nothing new to name
    assert json.loads((tmp_path / "harness.json").read_text())["added_with"] == [later]
