"""The one place for the test suite's tiny models, tokenizers, data and shared helpers (conftest.py only turns a
few of them into fixtures; no test module imports another test module or conftest).

Every architecture family the selective methods claim to support is built here from a config (random init, hidden
size 32, 2 blocks, vocabulary 128, nothing downloaded). `tests/` is on `sys.path` (pytest's rootdir conftest), so a
test anywhere under tests/ does `from testing_utils import ...`; the scripts under tests/scripts/ put it there
themselves.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers as T


if TYPE_CHECKING:
    from datasets import Dataset

    from peft_selective.continual import ContinualDPOConfig, ContinualDPOTrainer

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
SCRIPTS_DIR = TESTS_DIR / "scripts"
FIXTURES_DIR = TESTS_DIR / "fixtures"
BENCHMARKS_DIR = REPO_ROOT / "benchmarks"
EXAMPLES_DIR = REPO_ROOT / "examples"

# ------------------------------------------------------------------------------------------------ architecture families

VOCAB = 128
HIDDEN = 32
# token ids (inside the vocabulary: Phi-3 and others refuse a pad id outside it)
PAD, BOS, EOS = 0, 1, 2
# VLM special tokens, kept out of the random text ids drawn below (which are in [3, TEXT_TOKEN_MAX))
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 120, 121, 122, 123
TEXT_TOKEN_MAX = 120
SEQ_LEN = 7
BATCH = 2

_SPECIAL = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
# Shared by the Llama-like decoders.
_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    **_SPECIAL,
)


def _llama():
    return T.LlamaForCausalLM(T.LlamaConfig(**_DECODER))


def _mistral():
    return T.MistralForCausalLM(T.MistralConfig(**_DECODER, head_dim=8))


def _qwen2():
    return T.Qwen2ForCausalLM(T.Qwen2Config(**_DECODER))


def _qwen3():
    return T.Qwen3ForCausalLM(T.Qwen3Config(**_DECODER, head_dim=8))


def _gemma():
    return T.GemmaForCausalLM(T.GemmaConfig(**_DECODER, head_dim=8))


def _gemma2():
    return T.Gemma2ForCausalLM(T.Gemma2Config(**_DECODER, head_dim=8, sliding_window=4))


def _phi3():
    return T.Phi3ForCausalLM(T.Phi3Config(**_DECODER))


def _gpt2():
    return T.GPT2LMHeadModel(
        T.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, **_SPECIAL)
    )


def _gpt_neox():
    return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**{k: v for k, v in _DECODER.items() if k != "num_key_value_heads"}))


def _opt():
    config = T.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        word_embed_proj_dim=HIDDEN,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **_SPECIAL,
    )
    return T.OPTForCausalLM(config)


def _falcon():
    config = T.FalconConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, **_SPECIAL
    )
    return T.FalconForCausalLM(config)


def _mixtral():
    return T.MixtralForCausalLM(T.MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2))


def _qwen2_moe():
    config = T.Qwen2MoeConfig(
        **_DECODER,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
    )
    return T.Qwen2MoeForCausalLM(config)


_BERT = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    pad_token_id=PAD,
)


def _bert():
    return T.AutoModel.from_config(T.BertConfig(**_BERT))


def _bert_seq_cls():
    return T.BertForSequenceClassification(T.BertConfig(**_BERT, num_labels=3))


def _llava():
    vision = T.CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
        projection_dim=HIDDEN,
    )
    config = T.LlavaConfig(vision_config=vision, text_config=T.LlamaConfig(**_DECODER), image_token_index=IMAGE_TOKEN)
    return T.LlavaForConditionalGeneration(config)


def _qwen2_5_vl():
    vision = T.Qwen2_5_VLVisionConfig(
        depth=2,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_heads=4,
        out_hidden_size=HIDDEN,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=8,
        fullatt_block_indexes=[1],
    )
    # head_dim 8 -> 4 rotary frequencies, split over (temporal, height, width)
    text = dict(_DECODER, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    config = T.Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return T.Qwen2_5_VLForConditionalGeneration(config)


FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "phi3": _phi3,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "opt": _opt,
    "falcon": _falcon,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "bert": _bert,
    "bert_seq_cls": _bert_seq_cls,
    "llava": _llava,
    "qwen2_5_vl": _qwen2_5_vl,
}


def build_tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """Build the family's tiny model from scratch (deterministic for a given seed), in eval mode."""
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def _text_ids(generator: torch.Generator, length: int = SEQ_LEN) -> torch.Tensor:
    return torch.randint(3, TEXT_TOKEN_MAX, (BATCH, length), generator=generator)


def make_inputs(family: str) -> dict[str, torch.Tensor]:
    """A fixed batch of model inputs for the family (text, plus an image for the VLM families)."""
    generator = torch.Generator().manual_seed(1234)
    if family == "llava":
        # 16x16 image, 8x8 patches: 4 patch features per image (the CLS feature is dropped), so 4 image tokens.
        ids = _text_ids(generator)
        ids[:, 1:5] = IMAGE_TOKEN
        return {"input_ids": ids, "pixel_values": torch.randn(BATCH, 3, 16, 16, generator=generator)}
    if family == "qwen2_5_vl":
        # One image per sample: a 1x4x4 patch grid, merged 2x2 -> 4 image tokens between vision start/end.
        ids = _text_ids(generator, SEQ_LEN + 6)
        ids[:, 1] = VISION_START
        ids[:, 2:6] = IMAGE_TOKEN
        ids[:, 6] = VISION_END
        patches = torch.randn(BATCH * 16, 3 * 2 * 4 * 4, generator=generator)
        return {"input_ids": ids, "pixel_values": patches, "image_grid_thw": torch.tensor([[1, 4, 4]] * BATCH)}
    return {"input_ids": _text_ids(generator), "attention_mask": torch.ones(BATCH, SEQ_LEN, dtype=torch.long)}


#: Words of the tiny chat tokenizer (ids 4.., after <pad> <s> </s> <unk>): enough for small preference datasets.
CHAT_WORDS = (
    "the a is of capital paris france berlin germany what good bad yes no answer question "
    "red blue green one two three four five six seven eight nine ten short long"
).split()


def word_chat_tokenizer(extra_words: tuple[str, ...] = ()) -> T.PreTrainedTokenizerFast:
    """A word-level tokenizer small enough for the tiny models' 128-token vocabulary, with a chat template;
    `extra_words` (e.g. `(".",)`) come after `CHAT_WORDS`, so the other words keep their ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = CHAT_WORDS + list(extra_words)
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


def model_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits, or the last hidden state for bare encoders."""
    out = model(**inputs)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


#: The tiny chat Llama of the campaign tests (its vocabulary holds `word_chat_tokenizer`'s words).
TINY_CHAT_LLAMA = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def tiny_chat_llama(seed: int = 0, **overrides) -> T.LlamaForCausalLM:
    """The tiny chat Llama (`TINY_CHAT_LLAMA`, config fields overridable), randomly initialised from `seed`."""
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(T.LlamaConfig(**{**TINY_CHAT_LLAMA, **overrides}))


# ------------------------------------------------------------------------------------------------ continual DPO months

#: Words of the month prompts ("question red blue"), all in `CHAT_WORDS`.
WORDS = "red blue green one two three four five six seven".split()


def preference_month(chosen: str, rejected: str, n: int = 12, offset: int = 0) -> Dataset:
    """A conversational preference month: `n` questions, each answered `chosen` over `rejected`."""
    from datasets import Dataset

    prompts = [f"question {WORDS[(i + offset) % 10]} {WORDS[(i // 10 + offset) % 10]}" for i in range(n)]
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in prompts],
            "chosen": [[{"role": "assistant", "content": chosen}]] * n,
            "rejected": [[{"role": "assistant", "content": rejected}]] * n,
        }
    )


def continual_config(tmp_path: Path, name: str, **kwargs) -> ContinualDPOConfig:
    """A 3-step CPU `ContinualDPOConfig` for month `name` (its adapter name), writing under `tmp_path / name`."""
    from peft_selective.continual import ContinualDPOConfig

    defaults = dict(
        output_dir=str(tmp_path / name),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        adapter_name=name,
        disable_tqdm=True,
        seed=0,
    )
    return ContinualDPOConfig(**{**defaults, **kwargs})


def train_month_1(tmp_path: Path, peft_config=None, base=None, train_dataset=None, **kwargs) -> ContinualDPOTrainer:
    """Month "m1" ("yes" over "no", or `train_dataset`) trained on the tiny chat Llama (or `base`), its rows kept in a
    rehearsal buffer."""
    from peft_selective import SelectiveMLPConfig
    from peft_selective.continual import ContinualDPOTrainer, RehearsalBuffer

    trainer = ContinualDPOTrainer(
        base if base is not None else tiny_chat_llama(),
        args=continual_config(tmp_path, "m1", **kwargs),
        train_dataset=train_dataset if train_dataset is not None else preference_month("yes", "no"),
        processing_class=word_chat_tokenizer(),
        peft_config=peft_config or SelectiveMLPConfig(rank=4),
        rehearsal_buffer=RehearsalBuffer(tmp_path / "buffer"),
    )
    trainer.train()
    return trainer


# ------------------------------------------------------------------------------------------------ campaign CLI

#: `continual-dpo init` options of the tiny campaigns: small everything, only the plumbing is under test. Rehearsal,
#: KL and EWC stay on (their files are part of the plumbing); the rest of the recommended retention the campaign uses
#: by default (same-shape anchors, SFT term, boundary pairs: generation at every month's start) is pinned off, so these
#: tests train as they did before it became the default (tests/campaign/test_campaign_methods.py tests it).
CAMPAIGN_INIT = [
    "--method", "selective_mlp", "--rank", "4", "--learning_rate", "0.01", "--max_steps", "4", "--save_steps", "2",
    "--per_device_train_batch_size", "4", "--max_length", "64", "--rehearsal_ratio", "0.25", "--kl_coef", "0.5",
    "--kl_anchor_max_new_tokens", "2", "--kl_anchor_kinds", "general", "earlier_months", "--sft_weight", "0",
    "--boundary_pairs", "0", "--ewc_coef", "1.0", "--knowledge_questions", "3",
    "--perplexity_max_tokens", "128", "--refusal_prompts", "2", "--drift_prompts", "2", "--eval_batch_size", "4",
]  # fmt: skip


def write_month(path: Path, chosen: str, rejected: str, n: int = 15) -> str:
    """A campaign month's JSONL file at `path` (`n` questions, `chosen` over `rejected`); returns its path."""
    rows = [
        {
            "prompt": [{"role": "user", "content": f"question {WORDS[i % 10]} {WORDS[(i // 10) % 10]}"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def cli(*argv) -> int:
    """The `continual-dpo` CLI in-process (arguments stringified)."""
    from peft_selective.campaign.cli import main

    return main([str(a) for a in argv])


def copy_of(campaign: Path, tmp_path: Path) -> Path:
    """A copy of the campaign folder under `tmp_path`, for a test that changes it."""
    target = tmp_path / "campaign"
    shutil.copytree(campaign, target)
    return target


def finish_boundary_answers(monkeypatch) -> None:
    """Make the month t−1 model's boundary answers end with EOS, as a trained model's answers do: a random tiny
    model's greedy answers run to the token budget with no sentence end, and such answers are skipped
    (`ContinualDPOConfig.boundary_max_new_tokens`)."""
    from peft_selective.continual import trainer as trainer_module

    original = trainer_module.greedy_continuations

    def finished(model, tokenizer, *args, **kwargs):
        answers = original(model, tokenizer, *args, **kwargs)
        eos = tokenizer.eos_token_id
        return [answer if answer and answer[-1] == eos else answer + [eos] for answer in answers]

    monkeypatch.setattr(trainer_module, "greedy_continuations", finished)
