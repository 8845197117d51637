"""What the train stage builds on: the model, its loss, checkpoints, the memory check, Trainer callbacks, torchrun
launches and throughput figures.

May import tasks.data, tasks.tracking and tasks.plumbing; never a stage.
"""
