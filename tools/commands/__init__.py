"""uniref_deploy.tools.commands."""
