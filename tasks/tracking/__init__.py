"""MLflow and the registry: the store, a model's run and lineage, registered versions, loading a model by URI,
the promotion report and the served model's loader.

May import tasks.plumbing; never the data path, training or a stage.
"""
