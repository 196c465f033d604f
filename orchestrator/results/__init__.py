"""Results: run folders (`run_folder`), a run's typed record (`record`), evaluations as records
(`evaluations`), the Parquet store (`store`), the report (`report`) and plots (`plots`)."""
