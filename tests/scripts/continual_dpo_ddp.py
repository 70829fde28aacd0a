"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): two months of ContinualDPOTrainer on a
tiny Llama, month 2 with rehearsal, the anchor KL and EWC. Each rank writes its month-2 log history, so the test can
check both ranks saw the same (all-reduced) losses."""

import json
import sys
from pathlib import Path

import torch
import transformers
from datasets import Dataset

from peft_selective import SelectiveMLPConfig
from peft_selective.continual import ContinualDPOConfig, ContinualDPOTrainer, RehearsalBuffer


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from testing_utils import word_chat_tokenizer  # noqa: E402


def month(chosen: str, rejected: str, n: int = 16) -> Dataset:
    words = "red blue green one two three four five six seven".split()
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"question {words[i % 10]} {words[i // 10]}"}] for i in range(n)],
            "chosen": [[{"role": "assistant", "content": chosen}]] * n,
            "rejected": [[{"role": "assistant", "content": rejected}]] * n,
        }
    )


def main(out_dir: str) -> None:
    out = Path(out_dir)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    common = dict(
        max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[], use_cpu=True, bf16=False,
        logging_steps=1, save_strategy="no", seed=0, fisher_dir=str(out / "fisher"), disable_tqdm=True,
    )  # fmt: skip
    buffer = RehearsalBuffer(out / "buffer")
    first = ContinualDPOTrainer(
        model,
        args=ContinualDPOConfig(output_dir=str(out / "m1"), adapter_name="m1", **common),
        train_dataset=month("yes", "no"),
        processing_class=word_chat_tokenizer(),
        peft_config=SelectiveMLPConfig(rank=4),
        rehearsal_buffer=buffer,
    )
    first.train()
    first.finish_month("m1")
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
        train_dataset=month("good", "bad"),
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
