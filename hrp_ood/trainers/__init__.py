"""One module per method (OpenOOD's trainers): `hrp_ood.registry.METHODS` names them, `base` holds what they share,
`signals` their per-sample diagnostics."""
