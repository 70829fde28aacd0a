"""Run under `accelerate launch --num_processes 2 --cpu`: trains a SelectiveMLP adapter on a tiny Llama with the
transformers Trainer (DDP) and writes each rank's adapter weights, so the test can check the ranks agree."""

import sys
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import save_file

from peft_selective import SelectiveMLPConfig


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from testing_utils import tiny_chat_llama  # noqa: E402


def main(out_dir: str) -> None:
    model = get_peft_model(tiny_chat_llama(seed=0), SelectiveMLPConfig(rank=4))
    ids = torch.randint(1, 64, (16, 8), generator=torch.Generator().manual_seed(1)).tolist()
    args = transformers.TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,  # with torchrun env vars this makes accelerate pick MULTI_CPU (gloo)
        bf16=False,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids})
    )
    trainer.train()
    rank = trainer.args.process_index
    assert trainer.args.world_size == 2, trainer.args.world_size
    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(state, f"{out_dir}/rank{rank}.safetensors")


if __name__ == "__main__":
    main(sys.argv[1])
