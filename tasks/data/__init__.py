"""The data path from a source to training blocks: reading sources in pieces, duplicate digests, the workers (local
or Ray) that ingest and tokenize share, the tokenizer, record framing and fixed-size blocks.

May import tasks.tracking (a pretrained tokenizer by models:/ URI) and tasks.plumbing; never training or a stage.
"""
