"""Run month NAME of the campaign in DIR, and pause right after step STEP until the file RELEASE exists (a month
still training when another command starts). Prints "paused" when it is there. Usage: DIR NAME DATA STEP RELEASE"""

import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from peft_selective.campaign.campaign import Campaign


class PauseAtStep(TrainerCallback):
    def __init__(self, step: int, release: Path) -> None:
        self.step, self.release = step, release

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            print("paused", flush=True)
            while not self.release.exists():
                time.sleep(0.05)


if __name__ == "__main__":
    directory, name, data, step, release = sys.argv[1:6]
    Campaign(directory).run_month(name, data, callbacks=[PauseAtStep(int(step), Path(release))])
