"""``sparsify-matryoshka``, recording per rank what the distributed tests compare.

    python sparsify_recording.py RECORD_DIR CRASH_AFTER_SAVE CLI_ARGS...

Writes ``RECORD_DIR/rank{R}.json`` (R: ``$RANK``, 0 alone) when the run ends, however it
ends: each training forward's prefix sizes and loss, and each coder's BatchTopK
threshold at every save. With ``CRASH_AFTER_SAVE`` N > 0, rank 1 kills itself
(SIGKILL) right after its N-th save, as a crashed node would; the others go on.
"""

import json
import os
import signal
import sys
from pathlib import Path

from matryoshka_plugin.adapters.sparsify.coder import MatryoshkaSparseCoder
from matryoshka_plugin.adapters.sparsify.trainer import MatryoshkaTrainer
from matryoshka_plugin.cli.sparsify import main

record_dir, crash_after, argv = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
rank = int(os.environ.get("RANK", "0"))
seen = {"sizes": [], "losses": [], "thresholds": []}

step_sizes, forward, save = (
    MatryoshkaSparseCoder.step_sizes, MatryoshkaSparseCoder.forward, MatryoshkaTrainer.save
)


def recording_step_sizes(self):
    sizes = step_sizes(self)
    seen["sizes"].append(sizes)
    return sizes


def recording_forward(self, *args, **kwargs):
    out = forward(self, *args, **kwargs)
    if self.training:
        seen["losses"].append(float(out.fvu))
    return out


def recording_save(self):
    seen["thresholds"].append(
        {n: float(c.batch_topk_threshold) for n, c in self.saes.items()}
    )
    save(self)
    if rank == 1 and len(seen["thresholds"]) == crash_after:
        os.kill(os.getpid(), signal.SIGKILL)


MatryoshkaSparseCoder.step_sizes = recording_step_sizes
MatryoshkaSparseCoder.forward = recording_forward
MatryoshkaTrainer.save = recording_save
try:
    main(argv)
finally:
    record_dir.mkdir(parents=True, exist_ok=True)
    (record_dir / f"rank{rank}.json").write_text(json.dumps(seen))
