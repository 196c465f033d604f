"""orchestrator: everything distributed (Ray actors, driver, grids, results store, CLI)."""
