"""`edgecc tune` (MetaSchedule in a worker process) and `edgecc logs` (tuning records shared as JSON)."""
