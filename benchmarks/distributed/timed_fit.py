"""``sparsify-matryoshka`` with its training loop timed (run by ``run.py``, per rank).

    python -m benchmarks.distributed.timed_fit OUT.json CLI_ARGS...

Rank 0 (or the lone process) writes ``{"fit_s", "steps"}`` to ``OUT.json``: the seconds
spent in the Trainer's ``fit`` (model forward, coder steps, communication), without the
start-up and data preparation that a tokens/s figure should not include.
"""

import json
import os
import sys
import time
from pathlib import Path

from matryoshka_plugin.adapters.sparsify.trainer import MatryoshkaTrainer
from matryoshka_plugin.cli.sparsify import main

out, argv = Path(sys.argv[1]), sys.argv[2:]
fit = MatryoshkaTrainer.fit


def timed_fit(self):
    start = time.perf_counter()
    fit(self)
    if os.environ.get("RANK", "0") == "0":
        out.write_text(json.dumps({"fit_s": time.perf_counter() - start, "steps": self.global_step}))


MatryoshkaTrainer.fit = timed_fit
main(argv)
