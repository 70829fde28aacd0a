"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): two months of ContinualDPOTrainer on a
tiny Llama, month 2 with rehearsal, the anchor KL and EWC. Each rank writes its month-2 log history, so the test can
check both ranks saw the same (all-reduced) losses."""

import json
import sys
from pathlib import Path

import torch

from peft_selective import SelectiveMLPConfig
from peft_selective.continual import ContinualDPOConfig, ContinualDPOTrainer, RehearsalBuffer


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from testing_utils import preference_month, tiny_chat_llama, word_chat_tokenizer  # noqa: E402


def main(out_dir: str) -> None:
    out = Path(out_dir)
    model = tiny_chat_llama(seed=0)
    common = dict(
        max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[], use_cpu=True, bf16=False,
        logging_steps=1, save_strategy="no", seed=0, fisher_dir=str(out / "fisher"), disable_tqdm=True,
    )  # fmt: skip
    buffer = RehearsalBuffer(out / "buffer")
    first = ContinualDPOTrainer(
        model,
        args=ContinualDPOConfig(output_dir=str(out / "m1"), adapter_name="m1", **common),
        train_dataset=preference_month("yes", "no", n=16),
        processing_class=word_chat_tokenizer(),
        peft_config=SelectiveMLPConfig(rank=4),
        rehearsal_buffer=buffer,
    )
    first.train()
    # each process kept the reference log-probs of the rows it trained on; finish_month takes every process's
    assert len(first._month_reference_logps()) == 12  # 3 steps x 2 processes x 2 rows of 16
    first.finish_month("m1")
    rows = buffer.rows("m1")
    stored = torch.tensor([[row["reference_logps"]["chosen"], row["reference_logps"]["rejected"]] for row in rows])
    fresh = torch.tensor([[value["chosen"], value["rejected"]] for value in first._reference_logps_of_rows(rows)])
    torch.testing.assert_close(stored, fresh, rtol=1e-5, atol=1e-4)
    second = ContinualDPOTrainer(
        first.accelerator.unwrap_model(first.model),
        args=ContinualDPOConfig(
            output_dir=str(out / "m2"),
            adapter_name="m2",
            rehearsal_ratio=0.25,
            kl_coef=0.5,
            kl_anchor_max_new_tokens=2,
            ewc_coef=1.0,
            **common,
        ),  # fmt: skip
        train_dataset=preference_month("good", "bad", n=16),
        processing_class=word_chat_tokenizer(),
        peft_config=SelectiveMLPConfig(rank=4),
        rehearsal_buffer=buffer,
    )
    second.train()
    assert second.args.world_size == 2, second.args.world_size
    rank = second.args.process_index
    (out / f"rank{rank}.json").write_text(json.dumps(second.state.log_history))


if __name__ == "__main__":
    main(sys.argv[1])
