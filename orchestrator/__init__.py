"""orchestrator: everything distributed (Ray actors, driver, grids, results store, CLI).

The Python API (`orchestrator.api`): `from orchestrator import prune, evaluate, plan`.
"""

__all__ = ["prune", "evaluate", "plan", "RunRecord"]


def __getattr__(name: str):  # imported on first use: `import orchestrator.results.store` stays light
    if name in ("prune", "evaluate", "plan"):
        from orchestrator import api

        return getattr(api, name)
    if name == "RunRecord":
        from orchestrator.results.record import RunRecord

        return RunRecord
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
