"""Quickstart: a SelectiveMLP adapter on the bundled SmolLM2-135M-Instruct with plain PEFT calls.

`get_peft_model(model, SelectiveMLPConfig())` wraps the model, a few SFT steps train the adapter, `save_pretrained`
writes it, `PeftModel.from_pretrained` loads it back and `merge_and_unload` folds it into the base weights. Offline,
under a minute on a CPU:

    python examples/quickstart.py
    python examples/quickstart.py --steps 10 --output-dir outputs/quickstart
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from peft import PeftModel, get_peft_model

from peft_selective import SelectiveMLPConfig
from peft_selective.demo.embedded import load_embedded_model


# A new answer style to learn: the capital, in upper case, nothing else.
CHATS = [
    [{"role": "user", "content": f"What is the capital of {country}?"}, {"role": "assistant", "content": capital}]
    for country, capital in [("France", "PARIS."), ("Japan", "TOKYO."), ("Kenya", "NAIROBI."), ("Peru", "LIMA.")]
]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="SFT steps (one batch of all examples each)")
    parser.add_argument("--rank", type=int, default=8, help="SelectiveMLP rank (0: full rank)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--output-dir", default=None, help="where the adapter is saved (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    # 1. The base model (fp32) and a SelectiveMLP adapter on its MLP blocks, through PEFT's own entry point.
    base, tokenizer = load_embedded_model()
    config = SelectiveMLPConfig(rank=args.rank or None, alpha=2 * args.rank if args.rank else None)
    model = get_peft_model(base, config)
    model.print_trainable_parameters()

    # 2. A few SFT steps: causal-LM loss on the chats (prompt tokens included, enough for a quickstart).
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in CHATS]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    model.train()
    losses = []
    for step in range(args.steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        print(f"step {step + 1}: loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits

    # 3. Save the adapter, load it back onto a fresh base model, and merge it into the base weights.
    with tempfile.TemporaryDirectory() as tmp:
        output_dir = args.output_dir or tmp
        model.save_pretrained(output_dir)
        fresh_base, _ = load_embedded_model()
        reloaded = PeftModel.from_pretrained(fresh_base, output_dir).eval()
        with torch.no_grad():
            reloaded_logits = reloaded(**batch).logits
            merged = reloaded.merge_and_unload()
            merged_logits = merged(**batch).logits
    reload_diff = (reloaded_logits - trained).abs().max().item()
    merge_diff = (merged_logits - trained).abs().max().item()
    print(f"saved to {args.output_dir or 'a temporary folder'}; reloaded max |logit diff| {reload_diff:.2e}")
    print(f"merged into the base ({type(merged).__name__}): max |logit diff| {merge_diff:.2e}")

    question = [{"role": "user", "content": "What is the capital of Italy?"}]
    prompt = tokenizer(
        tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True), return_tensors="pt"
    )
    with torch.no_grad():
        answer = merged.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(answer[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"merged model: What is the capital of Italy? -> {text!r}")
    return {"losses": losses, "reload_diff": reload_diff, "merge_diff": merge_diff, "answer": text}


if __name__ == "__main__":
    main()
