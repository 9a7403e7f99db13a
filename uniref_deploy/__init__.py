"""uniref-deploy: deployment compiler and lean runtime for SELF-conditioned image-editing DiTs.

The stage folders at the repository root are mapped to ``uniref_deploy.<stage>`` by pyproject's package-dir.
"""

__version__ = "0.1.0"
