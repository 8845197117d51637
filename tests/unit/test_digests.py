"""ingest's on-disk digest set answers as a Python set of the same digests would, across spills and merges."""

from __future__ import annotations

import random

import numpy as np

from tasks.data import digests
from tasks.data.digests import DigestSet


def test_the_set_on_disk_answers_as_a_python_set(tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "IN_MEMORY", 64)  # many spills and merges from a few thousand digests
    rng = random.Random(3)  # noqa: S311 (test data, not secrets)
    pool = [rng.randbytes(16) for _ in range(3000)]
    # Digests alike in their first 8 bytes (a lookup must read the last 8 to tell them apart).
    pool += [pool[0][:8] + rng.randbytes(8) for _ in range(5)] + [pool[1][:8] + bytes(8), bytes(16)]
    seen, digest_set = set(), DigestSet(tmp_path)
    for _ in range(120):
        batch = list(dict.fromkeys(rng.choices(pool, k=rng.randrange(0, 90))))  # no two alike within a batch
        expected = [digest in seen for digest in batch]
        assert digest_set.add_new(b"".join(batch)).tolist() == expected
        seen.update(batch)
    assert len(digest_set.runs) > 1 and len(list(tmp_path.iterdir())) == 2 * len(digest_set.runs)
    held = sum(len(hi) for hi, _ in [*digest_set.runs, digest_set.recent])
    assert held == len(seen)  # each digest once: merges neither lose nor repeat one
    for hi, _ in digest_set.runs:
        assert np.all(hi[1:] >= hi[:-1])
