"""Built-in hardware profiles (TOML data files, one per device) shipped with edgesvd."""
