"""uniref_deploy.engines: the TensorRT stage.

``records`` holds the plan's data types, ``ranges`` derives each bucket's optimization profile from the packing
rules, ``plan`` turns a manifest into a ``BuildPlan`` (one engine per graph x precision, one profile per bucket),
``render`` prints it (table, ``polygraphy convert`` lines) and ``build`` runs it where TensorRT and a GPU are
present.
"""
