"""`bupo.train` with a stand-in reward, for tests/bupo/test_vllm_real.py: the tiny random model never solves an
arithmetic problem, so every reward would be 0, every advantage 0 and no weight would move. Here the reward is the
parity of a CRC-32 of the response text (a deterministic function of the sample), so groups have mixed rewards and
every step changes the weights that the next sync sends to vLLM.

    python tests/bupo/vllm_train_worker.py --section.field=value ...     (the arguments of `bupo train`)
"""

import sys
import zlib

from bupo import train
from bupo.reward import RewardResult


def parity_rewards(responses: list[str], ground_truths: list, **kw) -> list[RewardResult]:
    bits = [zlib.crc32(r.encode()) % 2 for r in responses]
    return [RewardResult(float(b), "correct" if b else "wrong") for b in bits]


if __name__ == "__main__":
    train.score_batch = parity_rewards
    train.main(sys.argv[1:])
