"""``fastrl bench``: the benchmark suite (see ``fastrl.bench.harness`` for the method and
``fastrl.bench.registry`` for the suites). ``python -m fastrl.bench --help`` lists the options."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from fastrl.bench.runner import main as run

    return run(argv)
