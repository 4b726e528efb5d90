"""The device side: runtime back-ends, predictor, bench, doctor, device profiles, pack, remote,
deploy. Never imports torch or the workstation side (checked by import-linter, see pyproject.toml)."""
