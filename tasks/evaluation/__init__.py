"""What evaluate and promote judge a model with beside perplexity: benchmark tasks through lm-evaluation-harness.

May import tasks.data, tasks.tracking and tasks.plumbing; never training or a stage.
"""
