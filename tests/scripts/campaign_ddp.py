"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): month NAME of the campaign in DIR on both
processes. Each rank writes the month's training log to rank<k>.json next to the campaign, so the test can check that
both trained (same all-reduced losses) while only the main process wrote the campaign. Usage: DIR NAME DATA"""

import json
import sys
from pathlib import Path

from transformers import TrainerCallback

from peft_selective.campaign.campaign import Campaign


class KeepLog(TrainerCallback):
    def __init__(self) -> None:
        self.history = []

    def on_train_end(self, args, state, control, **kwargs):
        self.history = list(state.log_history)
        rank = args.process_index
        Path(sys.argv[1]).parent.joinpath(f"rank{rank}.json").write_text(json.dumps(self.history))


if __name__ == "__main__":
    directory, name, data = sys.argv[1:4]
    Campaign(directory).run_month(name, data, callbacks=[KeepLog()])
