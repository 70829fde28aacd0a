"""Run month NAME of the campaign in DIR and SIGKILL this process right after the checkpoint of step STEP - 1 and the
step STEP are done (the kill -9 of a crashed or pre-empted job). Usage: campaign_kill.py DIR NAME DATA STEP"""

import os
import signal
import sys

from transformers import TrainerCallback

from peft_selective.campaign.campaign import Campaign


class KillAtStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    directory, name, data, step = sys.argv[1:5]
    Campaign(directory).run_month(name, data, callbacks=[KillAtStep(int(step))])
