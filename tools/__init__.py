"""uniref_deploy.tools."""
