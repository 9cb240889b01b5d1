"""Builds the built-in models' directories: a Qwen2-VL (or Qwen2.5-VL) in Hugging Face format with a
byte-level BPE tokenizer trained locally and random weights from a fixed seed. Same preset, same bytes.
The `shapes` preset is the layout the shapes-world model is trained in (serving/training)."""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from serving.engine.image_processor import CLIP_MEAN, CLIP_STD
from serving.engine.models.config import load_model_config
from serving.engine.models.qwen2_vl import Qwen2VL

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip

# Qwen2-VL's chat template: a default system turn, image parts as vision_start/image_pad/vision_end,
# video parts as vision_start/video_pad/vision_end.
# Qwen2-VL's template, with Qwen2.5's tool calling (Hermes style): the tools in the system turn, an
# assistant's calls as <tool_call> blocks, tool results in a user turn. Without tools it renders
# exactly as Qwen2-VL's. Newlines right after a block tag are written as {{ '\n' }}: chat templates
# render with trim_blocks, which drops them.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' and messages[0]['content'] is string %}"
    "{{ messages[0]['content'] }}{% else %}You are a helpful assistant.{% endif %}"
    "{{ '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, '
    '\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}{% endif %}'
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' and message['content'] is string %}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n<tool_response>\\n' }}{{ message['content'] }}{{ '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}<|im_start|>assistant"
    "{% if message['content'] %}{{ '\\n' }}{{ message['content'] }}{% endif %}"
    "{% for tool_call in message['tool_calls'] %}"
    "{% if tool_call['function'] is defined %}{% set tool_call = tool_call['function'] %}{% endif %}"
    "{{ '\\n<tool_call>\\n{\\\"name\\\": \\\"' }}{{ tool_call['name'] }}{{ '\\\", \\\"arguments\\\": ' }}"
    "{{ tool_call['arguments'] | tojson }}{{ '}\\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% else %}"
    "{% if loop.first and message['role'] != 'system' and not tools %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content or 'video_url' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the a an one two three red green blue small large image picture photo cat dog bird tree house "
    "car road sky sun cloud water river mountain person people man woman child table chair window "
    "door book is are was were has have shows show there here this that what which where who how why "
    "when and or but with without on in under over near left right top bottom middle color shape "
    "square circle line light dark bright describe answer question model vision language token text "
    "encode prefill decode serve request stream fast slow good bad yes no please thank you assistant "
    "user system of to "
).split()


@dataclass(frozen=True)
class Preset:
    text: dict[str, Any]
    vision: dict[str, Any]
    max_pixels: int
    min_pixels: int = 28 * 28 * 4
    bpe_vocab: int = 2048
    gain: float = 2.4  # weight std = gain / sqrt(fan_in): 0.3 at width 64, varied greedy output
    # The shapes model's tokenizer learns from the task's own prompts too and splits numbers into
    # single digits (as Qwen2's does), so a number's answer is read out digit by digit.
    task_corpus: bool = False
    video_max_pixels: int | None = None  # per frame; None: Qwen2-VL's video default


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3]),
        vision=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2),
        max_pixels=28 * 28 * 64,
    ),
    "small": Preset(
        text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12]),
        vision=dict(depth=6, embed_dim=256, num_heads=4, mlp_ratio=4),
        max_pixels=28 * 28 * 256,
    ),
    "shapes": Preset(
        text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[8, 12, 12]),
        vision=dict(depth=4, embed_dim=128, num_heads=4, mlp_ratio=4),
        max_pixels=28 * 28 * 64, min_pixels=28 * 28 * 16, bpe_vocab=768, task_corpus=True,
        video_max_pixels=28 * 28 * 36,
    ),
    # Qwen2.5-VL-7B's decoder width (hidden 3584, 28 query and 4 KV heads of 128, MLP 18944) with 4 of
    # its 28 layers and a small vocabulary and tower: what a decode step reads per layer is the real
    # model's, at an eighth of its weight bytes (1.9 GB in bfloat16), so a GPU check builds it in
    # seconds and compares its decode rate with the memory-bandwidth roofline.
    "7b-wide": Preset(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=4, num_attention_heads=28,
                  num_key_value_heads=4, mrope_section=[16, 24, 24]),
        vision=dict(depth=1, embed_dim=64, num_heads=2, mlp_ratio=2),
        max_pixels=28 * 28 * 64,
    ),
    # The shapes layout at test size: the training recipe's tests run it for a few dozen steps.
    "shapes-tiny": Preset(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3]),
        vision=dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2),
        max_pixels=28 * 28 * 16, min_pixels=28 * 28 * 4, bpe_vocab=512, task_corpus=True,
        video_max_pixels=28 * 28 * 9,
    ),
}  # fmt: skip


def _corpus(lines: int = 6000) -> list[str]:
    rng = random.Random(0)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 999)))
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return out


def _task_corpus() -> list[str]:
    """Every prompt the shapes-world tasks can ask, and their answer words often enough that each
    becomes one token of its own (an answer is then one decode step plus the end)."""
    from serving.evals.prompts import all_prompts, answer_words

    return [line for line in all_prompts() for _ in range(4)] + [
        w for w in answer_words() for _ in range(200)
    ]


def build_tokenizer(bpe_vocab: int, task_corpus: bool = False) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if task_corpus:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus() + (_task_corpus() if task_corpus else []), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _config(preset: Preset, family: str, tok: Tokenizer) -> dict[str, Any]:
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab = math.ceil(tok.get_vocab_size() / 128) * 128
    t = dict(preset.text)
    section = t.pop("mrope_section")
    text_config = dict(
        t, vocab_size=vocab, hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], use_sliding_window=False,
        model_type=f"{family}_text",
    )  # fmt: skip
    v = preset.vision
    common = dict(depth=v["depth"], num_heads=v["num_heads"], patch_size=14, temporal_patch_size=2,
                  spatial_merge_size=2, in_channels=3, model_type=f"{family}_vision",
                  rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})  # fmt: skip
    if family == "qwen2_vl":
        vision_config = dict(common, embed_dim=v["embed_dim"], hidden_size=t["hidden_size"],
                             mlp_ratio=v["mlp_ratio"], hidden_act="quick_gelu")  # fmt: skip
        arch = "Qwen2VLForConditionalGeneration"
    else:
        vision_config = dict(common, hidden_size=v["embed_dim"], out_hidden_size=t["hidden_size"],
                             intermediate_size=v["embed_dim"] * v["mlp_ratio"], hidden_act="silu",
                             window_size=56, fullatt_block_indexes=[v["depth"] - 1],
                             tokens_per_second=2)  # fmt: skip
        arch = "Qwen2_5_VLForConditionalGeneration"
    return dict(
        architectures=[arch], model_type=family, dtype="float32", tie_word_embeddings=False,
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip


def random_weights(model: Qwen2VL, seed: int, gain: float) -> dict[str, torch.Tensor]:
    """Every weight from one seeded generator, in sorted name order: the same bytes on every build.
    Norm weights sit near 1 and biases are non-zero so that loading each of them is tested."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, param in sorted(model.state_dict().items()):
        shape = param.shape
        noise = torch.randn(shape, generator=gen)
        if param.dim() == 1 and ("norm" in name or "ln_q" in name) and name.endswith("weight"):
            out[name] = 1.0 + 0.1 * noise
        elif param.dim() == 1:
            out[name] = 0.1 * noise
        elif name.endswith("embed_tokens.weight"):
            out[name] = noise
        else:
            fan_in = math.prod(shape[1:])
            out[name] = noise * (gain / math.sqrt(fan_in))
    return {k: v.contiguous() for k, v in out.items()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_model(out: str | Path, preset: str = "tiny", family: str = "qwen2_vl", seed: int = 0) -> Path:
    """Write the model directory atomically (built beside it, then renamed into place)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tok = build_tokenizer(p.bpe_vocab, p.task_corpus)
        tok.save(str(tmp / "tokenizer.json"))
        config = _config(p, family, tok)
        _write_json(tmp / "config.json", config)
        im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
        _write_json(tmp / "generation_config.json", {"bos_token_id": eot, "eos_token_id": [im_end, eot],
                                                      "pad_token_id": eot, "do_sample": False})  # fmt: skip
        _write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "bos_token": None, "model_max_length": 32768,
            "chat_template": CHAT_TEMPLATE,
        })  # fmt: skip
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        if p.video_max_pixels is not None:
            _write_json(tmp / "video_preprocessor_config.json", {
                "video_processor_type": "Qwen2VLVideoProcessor", "min_pixels": p.min_pixels,
                "max_pixels": p.video_max_pixels, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
            })  # fmt: skip
        _write_json(tmp / "preprocessor_config.json", {
            "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
            "do_normalize": True, "do_convert_rgb": True, "rescale_factor": 1 / 255, "resample": 3,
            "min_pixels": p.min_pixels, "max_pixels": p.max_pixels,
            "size": {"shortest_edge": p.min_pixels, "longest_edge": p.max_pixels},
            "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        })  # fmt: skip
        model = Qwen2VL(load_model_config(tmp))
        save_file(
            random_weights(model, seed, p.gain), str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is meant to be shared
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_model(out: str | Path, preset: str = "tiny") -> Path:
    """The model directory, built first if it is missing."""
    out = Path(out)
    if not (out / "config.json").exists():
        build_model(out, preset)
    return out
