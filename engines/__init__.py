"""uniref_deploy.engines: the TensorRT stage.

``plan`` turns a manifest into a ``BuildPlan`` (one engine per bucket x precision, optimization profiles from the
packing rules) as plain data; ``build`` runs it through polygraphy where TensorRT and a GPU are present.
"""
