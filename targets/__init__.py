"""Hardware target descriptions, one TOML file per target."""
