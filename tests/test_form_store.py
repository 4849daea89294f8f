"""The on-disk store of derived closed forms: what it returns is what this code derives, or nothing."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import sympy as sp

from sfed_theory import form_store
from sfed_theory.derivation import closed_form, derive

FORM = ("adapter_output", "fedit", "adam")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("SFED_FORM_CACHE", str(tmp_path))
    closed_form.cache_clear()
    yield tmp_path
    closed_form.cache_clear()


def test_a_derived_form_is_stored_and_read_back_equal(store):
    assert form_store.load(*FORM) is None
    fresh = closed_form(*FORM)
    stored = form_store.load(*FORM)
    assert stored is not None and stored == fresh == derive(*FORM).result
    assert list(store.glob(f"{form_store.code_key()}/*.pickle"))


def test_closed_form_returns_the_stored_form(store):
    # a planted entry is what closed_form returns: the store is really read, not derived around
    planted = sp.Symbol("planted")
    form_store.save(*FORM, planted)
    assert closed_form(*FORM) == planted


def test_an_unreadable_entry_is_derived_again_and_overwritten(store):
    path = store / form_store.code_key() / "adapter_output__fedit__adam.pickle"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a pickle")
    assert form_store.load(*FORM) is None
    assert closed_form(*FORM) == derive(*FORM).result
    assert form_store.load(*FORM) == derive(*FORM).result


def test_changed_deriving_code_misses_the_store(store, monkeypatch):
    form_store.save(*FORM, sp.Symbol("old"))
    monkeypatch.setattr(form_store, "code_key", lambda: "another-code-version")
    assert form_store.load(*FORM) is None


def test_the_key_follows_the_deriving_code_and_sympy():
    code = (
        "import sympy, sfed_theory.form_store as f; sympy.__version__ = '0.0-{}'; print(f.code_key())"
    )
    keys = {subprocess.run([sys.executable, "-c", code.format(v)], capture_output=True, text=True,
                           check=True).stdout.strip() for v in ("a", "b")}
    assert len(keys) == 2 and form_store.code_key() not in keys


def test_off_stores_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SFED_FORM_CACHE", "off")
    assert form_store.store_dir() is None
    form_store.save(*FORM, sp.Symbol("x"))
    assert form_store.load(*FORM) is None


def test_an_empty_setting_means_the_default_place(monkeypatch):
    monkeypatch.setenv("SFED_FORM_CACHE", "  ")
    assert form_store.store_dir() is not None and form_store.store_dir().name == "sfed-theory"


def test_a_form_that_cannot_be_stored_leaves_nothing_behind(store, monkeypatch):
    def refuse(_):
        raise pickle.PicklingError("no")

    monkeypatch.setattr(form_store.pickle, "dumps", refuse)
    form_store.save(*FORM, sp.Symbol("x"))
    assert form_store.load(*FORM) is None
    assert not [p for p in store.rglob("*") if p.is_file()]
