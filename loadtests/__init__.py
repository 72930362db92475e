"""Load generator, reports, locustfile and benchmark comparisons (``ragtune loadtest``, ``ragtune bench``).

Public entry points: :func:`loadtests.runner.run_loadtest`, :func:`loadtests.cli.add_cli`,
:func:`loadtests.bench.run_bench`; the config is :class:`loadtests.config.LoadTestConfig`.
Submodules are imported lazily so ``import loadtests`` stays cheap.
"""

__all__ = ["add_cli", "run_loadtest"]


def __getattr__(name: str):
    if name == "run_loadtest":
        from loadtests.runner import run_loadtest

        return run_loadtest
    if name == "add_cli":
        from loadtests.cli import add_cli

        return add_cli
    raise AttributeError(name)
