"""A stand-in for edgecc.autotune.tune_worker that dies the way TVM can: a segfault inside a task."""

import os
import signal
import sys
from pathlib import Path

logs = Path(sys.argv[1]) / "logs"
logs.mkdir(exist_ok=True)
(logs / "tvm.s_tir.meta_schedule.logging.task_0_fused_matmul_add.log").write_text("tuning\n")
os.kill(os.getpid(), signal.SIGSEGV)
