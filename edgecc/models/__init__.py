"""The example models edgecc builds and exports (torch: export time only)."""
