"""SDK helpers that model code calls directly."""

from __future__ import annotations

from infergate_worker import InvalidInput, run_together


def test_run_together_runs_usable_items_once_and_splits_rows_back():
    bad = InvalidInput("no text")
    passes: list[list[list[str]]] = []

    def forward(usable: list[list[str]]) -> list[str]:
        passes.append(usable)
        return [t.upper() for ts in usable for t in ts]

    results = run_together(
        [["a", "b"], bad, ["c"], ["d", "e", "f"]], forward, len, lambda ts, rows: (ts, rows)
    )

    assert passes == [[["a", "b"], ["c"], ["d", "e", "f"]]]
    assert results == [
        (["a", "b"], ["A", "B"]),
        bad,
        (["c"], ["C"]),
        (["d", "e", "f"], ["D", "E", "F"]),
    ]
    assert results[1] is bad


def test_run_together_skips_the_forward_pass_when_no_item_is_usable():
    errors = [InvalidInput("one"), InvalidInput("two")]

    def forward(usable: list[str]) -> list[str]:
        raise AssertionError(f"forward called with {usable}")

    assert run_together(errors, forward, len, lambda p, rows: rows) == errors
