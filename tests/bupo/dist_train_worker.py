"""Worker for test_world_size.py: the whole trainer (`bupo.train.main`), alone or under torchrun, with a stand-in
reward that depends only on the response text (a random tiny model never solves the arithmetic task, so the real
reward would be 0 everywhere and no advantage would be non-zero).

Usage: python tests/bupo/dist_train_worker.py --section.field=value ...   (the trainer's own arguments)
"""

import sys
import zlib

import bupo.train
from bupo.reward import RewardResult


def stand_in_score_batch(responses: list[str], ground_truths: list, **_) -> list[RewardResult]:
    scores = [float(zlib.crc32(r.encode()) % 3 == 0) for r in responses]
    return [RewardResult(s, "correct" if s else "wrong") for s in scores]


if __name__ == "__main__":
    bupo.train.score_batch = stand_in_score_batch
    bupo.train.main(sys.argv[1:])
