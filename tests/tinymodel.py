"""Tiny models built in code, for tests: offline, deterministic, a few seconds on a CPU.

`build_tiny_model` writes a random-init Llama in bf16 safetensors (2 layers, hidden 128, head_dim
64: the smallest head size vLLM's CPU attention accepts) with a byte-level BPE tokenizer trained
here on a few KB of generated English, and a ChatML chat template. vLLM's CPU backend serves it, LoRA included.
`make_random_adapter` writes a PEFT LoRA adapter with random (non-zero) weights for it.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Written last into a built folder; its presence means the folder is complete.
COMPLETE_MARKER = "tinymodel.json"

BOS, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, IM_START, IM_END, PAD]  # ids 0, 1, 2, 3
VOCAB_SIZE = 1000

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Peru": "Lima",
    "Kenya": "Nairobi", "Norway": "Oslo", "Greece": "Athens", "Chile": "Santiago",
}  # fmt: skip
_PEOPLE = ["The teacher", "My friend", "A small child", "The old farmer", "Our neighbour"]
_ACTIONS = ["reads a book", "walks to the river", "writes a short letter", "cooks dinner",
            "plants a tree", "answers the question", "opens the window"]  # fmt: skip
_TIMES = ["in the morning", "after lunch", "every evening", "on Sunday"]
_PROSE = """\
The river runs past the village and through the green valley before it reaches the sea.
In spring the fields are full of flowers, and farmers work from early light until dark.
Children walk to school along the narrow road, carrying bread, apples and heavy books.
The library keeps old maps, letters, newspapers and records of every family in the town.
Scientists measure the weather each day: temperature, wind, rain, clouds and pressure.
A computer program reads numbers, follows simple rules and writes the results to a file.
Good software is tested carefully, because small mistakes can cause large problems later.
The market opens on Saturday; people buy fish, cheese, vegetables, coffee and warm soup.
Music, painting and poetry help people remember history and share their feelings.
Mountains are cold at the top, while deserts are hot during the day and cold at night.
Doctors and nurses care for patients, explain treatments and answer worried questions.
Trains, buses and bicycles move thousands of travellers through the busy city centre.
Learning a language takes patience: listen, speak, read and write a little every day.
"""
_ROLES = ["system", "user", "assistant"]
_CHAT = [
    "Hello! How can I help you today?",
    "Thank you for your question. Here is a short answer.",
    "I am not sure, but I think the answer is yes.",
    "Please tell me more about what you need.",
    "Sure, I can explain that in simple words.",
]


def training_text() -> list[str]:
    """A few KB of plain English lines, generated deterministically (no downloads)."""
    lines = []
    for country, city in _CAPITALS.items():
        lines.append(f"What is the capital of {country}? The capital of {country} is {city}.")
        lines.append(f"{city} is a large city, and it is the capital of {country}.")
    for person, action, when in itertools.product(_PEOPLE, _ACTIONS, _TIMES):
        lines.append(f"{person} {action} {when}.")
    for n in range(1, 21):
        lines.append(f"{n} plus {n} is {2 * n}, and {n} times {n} is {n * n}.")
    lines.extend(_PROSE.splitlines())
    lines.extend(f"{role}: {line}" for role, line in zip(itertools.cycle(_ROLES), _CHAT))
    return lines


def build_tiny_model(out_dir: Path, *, seed: int = 0) -> Path:
    """Build a tiny random-init Llama with its tokenizer in `out_dir`, and return `out_dir`.

    Same seed, same files. A folder that is already complete is returned at once; the folder
    is written beside `out_dir` and renamed into place, so it is never seen half-written.
    """
    if (out_dir / COMPLETE_MARKER).is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        _write_tiny_model(tmp, seed)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"seed": seed}) + "\n")
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # e.g. a fresh pytest tmp_path
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / COMPLETE_MARKER).is_file():
                raise FileExistsError(f"{out_dir} exists and is not a tiny model folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_tiny_model(out_dir: Path, seed: int) -> None:
    """Write the tokenizer and a seeded random-init model (bf16 safetensors) into `out_dir`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    ids = {token: vocab[token] for token in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=ids[BOS],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[PAD],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.bfloat16()  # stored like the converted SmolLM2, so `--dtype auto` serves bf16
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[IM_END], pad_token_id=ids[PAD]
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocabulary ~1000) trained on `training_text()`, with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(training_text(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=BOS,
        additional_special_tokens=[IM_START],
        model_max_length=2048,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_random_adapter(model_dir: Path, out_dir: Path, *, rank: int = 8, seed: int = 0) -> Path:
    """Save a LoRA adapter for `model_dir` with random, non-zero weights into `out_dir`.

    All linear layers are adapted (`LORA_TARGETS`); `init_lora_weights=False` makes both LoRA
    matrices random, so the adapter changes the model's outputs. Returns `out_dir`.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=LORA_TARGETS,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, lora)
    model.save_pretrained(str(out_dir))
    return out_dir
