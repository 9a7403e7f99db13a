"""uniref_deploy.calibration."""
