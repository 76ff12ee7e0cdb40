"""`lacd run`, except that one stage stops right after doing its work, before it is marked done.

    python paused_daemon.py STAGE MARKER_FILE

The test SIGKILLs this process once MARKER_FILE appears: the stage's output exists but the
database does not say so, the worst moment for a resume.
"""

import sys
import time
from pathlib import Path

from lacd.cli import main
from lacd.pipeline import stages

stage, marker = sys.argv[1], Path(sys.argv[2])
real = stages.STAGE_FUNCTIONS[stage]


def paused(ctx):
    result = real(ctx)
    marker.write_text(stage)
    time.sleep(3600)
    return result


stages.STAGE_FUNCTIONS[stage] = paused
sys.argv = ["lacd", "run"]
main()
