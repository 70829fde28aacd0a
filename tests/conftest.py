"""Shared tiny-model factories for the test suite.

Every architecture family the selective methods claim to support is built here from a config (random init, hidden
size 32, 2 blocks, vocabulary 128, nothing downloaded). Building is cached once per session and every test gets a
deep copy, so a test may wrap / mutate its model freely and models built for the same family are bit-identical.

Fixtures:
    make_tiny_model(family) -> a fresh eval-mode copy of the family's tiny base model
    tiny_inputs(family)     -> a fixed batch of model inputs (text, plus an image for the VLM families)
    model_output            -> `model_output(model, inputs)`: the logits (or last hidden state for bare encoders)
    tiny_families           -> the names of all families, in a stable order
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import pytest
import torch
import transformers as T


# The models are tiny: intra-op threads only add OpenMP spin/hand-off overhead, which on a loaded 2-core CI box made
# a 32x32 matmul take ~25 ms instead of ~0.1 ms (50x slower test suite). One thread unless the user asked otherwise.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

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

_PRISTINE: dict[str, torch.nn.Module] = {}


def build_tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """Build the family's tiny model from scratch (deterministic for a given seed), in eval mode."""
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def _make_tiny_model(family: str) -> torch.nn.Module:
    if family not in _PRISTINE:
        _PRISTINE[family] = build_tiny_model(family)
    return copy.deepcopy(_PRISTINE[family])


def _text_ids(generator: torch.Generator, length: int = SEQ_LEN) -> torch.Tensor:
    return torch.randint(3, TEXT_TOKEN_MAX, (BATCH, length), generator=generator)


def _make_inputs(family: str) -> dict[str, torch.Tensor]:
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


def word_chat_tokenizer() -> T.PreTrainedTokenizerFast:
    """A word-level tokenizer small enough for the tiny models' 128-token vocabulary, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3, **{w: i + 4 for i, w in enumerate(CHAT_WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


def _model_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


#: The tiny chat Llama of the campaign tests (its vocabulary holds `word_chat_tokenizer`'s words).
TINY_CHAT_LLAMA = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_chat_base(tmp_path_factory) -> str:
    """A folder with a tiny random chat Llama and its word tokenizer: the campaign tests' `--base_model`."""
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(**TINY_CHAT_LLAMA)).save_pretrained(path)
    word_chat_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_families() -> list[str]:
    return list(FAMILIES)


@pytest.fixture(scope="session")
def make_tiny_model() -> Callable[[str], torch.nn.Module]:
    return _make_tiny_model


@pytest.fixture(scope="session")
def tiny_inputs() -> Callable[[str], dict[str, torch.Tensor]]:
    return _make_inputs


@pytest.fixture(scope="session")
def model_output() -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    return _model_output
