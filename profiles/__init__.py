"""Built-in hardware profiles (TOML data files, one per device), installed as `edgesvd.builtin_profiles`."""
