"""Run under `accelerate launch --num_processes 2 --cpu`: trains a SelectiveMLP adapter on a tiny Llama with the
transformers Trainer (DDP) and writes each rank's adapter weights, so the test can check the ranks agree."""

import sys

import torch
import transformers
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import save_file

from peft_selective import SelectiveMLPConfig


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64, pad_token_id=0
    )
    model = get_peft_model(transformers.LlamaForCausalLM(config), SelectiveMLPConfig(rank=4))
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
