"""uniref_deploy.export."""
