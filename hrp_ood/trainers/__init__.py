"""One module per method (OpenOOD's trainers): `registry.METHODS` names them, `base` holds what they share.

Nothing is imported here: `hrp_ood.config` reads the registry without loading torch-heavy method code."""
