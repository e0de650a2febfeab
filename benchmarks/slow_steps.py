"""``python benchmarks/slow_steps.py <fluxserve arguments>``: the fluxserve command line, with every denoising
step lasting at least ``FLUXSERVE_STEP_DELAY_S`` seconds (none when unset or 0). The demo models finish a job in
milliseconds; with a delay, a job is still running when a test or the fleet benchmark kills its process."""

import os
import sys
import time

step_s = float(os.environ.get("FLUXSERVE_STEP_DELAY_S") or 0)
if step_s > 0:
    from fluxserve.engine import Engine

    _render = Engine.render  # the GPU part, which workers and Engine.generate both run

    def render(self, request, on_progress=None, should_cancel=None):
        def slow(progress):
            time.sleep(step_s)
            if on_progress is not None:
                on_progress(progress)

        return _render(self, request, slow, should_cancel)

    Engine.render = render

from fluxserve.cli import main  # after the patch, so the command line runs the slowed engine

sys.exit(main(sys.argv[1:]))
