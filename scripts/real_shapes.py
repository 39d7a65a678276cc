#!/usr/bin/env python3
"""Write checkpoint folders of the shapes users run, with random weights, as the hub ships them.

    python scripts/real_shapes.py SHAPE DTYPE OUT [--tokenizer PATH/tokenizer.model] [--seed N]

SHAPE:
  llava-hf-7b     llava-hf/llava-1.5-7b-hf: LlavaForConditionalGeneration (CLIP ViT-L/14-336, mlp2x_gelu,
                  LLaMA-7B, vocab 32064), three safetensors shards + model.safetensors.index.json,
                  preprocessor_config.json (336), the hub's minimal config.json.
  liuhaotian-7b   liuhaotian/llava-v1.5-7b: LlavaLlamaForCausalLM config with mm_* keys, two PyTorch .bin shards
                  + pytorch_model.bin.index.json, and its CLIP tower (openai/clip-vit-large-patch14-336, a full
                  CLIPModel in f32 safetensors) in OUT/clip-vit-large-patch14-336, named by a relative path.
  tinyllama       TinyLlama/TinyLlama-1.1B-Chat-v1.0: LlamaForCausalLM, GQA 32/4 heads, one model.safetensors.
  llama-7b        lmsys/vicuna-7b-v1.5 shape: LlamaForCausalLM 7B, two safetensors shards.
DTYPE: f16 | bf16 (| f32).

--fill zeros writes safetensors shards whose data are all zero as sparse files (no disk blocks, no
random draws): seconds instead of minutes for a 7B folder, for memory plans and measurements where the
values do not matter.

Weights are drawn tensor by tensor (normal, std 0.02; norms 1; biases 0) and written shard by shard, so the
whole model is never in memory at once. The configs are those of the hub (see ../shared/bench/real-shapes.md);
everything not listed there is transformers' default. With --tokenizer the LLaMA SentencePiece model is copied
in (with <image> and <pad> added for llava-hf, as the hub's tokenizer has them).
"""
import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
TORCH_NAME = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}
GIB = 1 << 30


def llava_hf_config(dtype):
    return {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
        "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu", "tie_word_embeddings": False,
        "torch_dtype": TORCH_NAME[dtype], "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "vocab_size": 32064,
        "text_config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096, "model_type": "llama",
                        "rms_norm_eps": 1e-05, "torch_dtype": TORCH_NAME[dtype], "vocab_size": 32064},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                          "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    }


def llama_7b_config(dtype, vocab=32000):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": TORCH_NAME[dtype]}


def tinyllama_config(dtype):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
            "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 32000,
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu",
            "torch_dtype": TORCH_NAME[dtype]}


def clip_336_config():
    # openai/clip-vit-large-patch14-336 (full CLIPModel; text tower included, as the hub ships it).
    return CLIPConfig(
        text_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                     "num_hidden_layers": 12, "projection_dim": 768},
        vision_config={"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                       "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
        projection_dim=768)


def shapes_of(model_cls, config):
    """Parameter names and shapes of a transformers model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = model_cls(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()
            if not name.endswith("position_ids") and not name.endswith("inv_freq")]


def draw(name, shape, dtype, gen):
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1 and ("norm" in name or "layernorm" in name or "layrnorm" in name):
        return torch.ones(shape, dtype=dtype)
    if name.endswith("logit_scale"):
        return torch.full(shape, 2.6592, dtype=dtype)
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(dtype)


SAFETENSORS_DTYPE = {"f16": "F16", "bf16": "BF16", "f32": "F32"}


def write_sparse_safetensors(path, group, dtype):
    """A safetensors file of zeros: the header, then the data section as a hole (a sparse file)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in group:
        nbytes = torch.Size(shape).numel() * DTYPES[dtype].itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.truncate(8 + len(text) + offset)
    return offset


def write_shards(out, tensors, dtype, shards, fmt, gen, zeros=False):
    """Splits `tensors` (name, shape) into `shards` files of about equal bytes, in order, as save_pretrained does."""
    total = sum(torch.Size(s).numel() for _, s in tensors) * DTYPES[dtype].itemsize
    budget = total / shards
    groups, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = torch.Size(shape).numel() * DTYPES[dtype].itemsize
        if current and size + nbytes > budget and len(groups) < shards - 1:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    groups.append(current)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"{stem}.{ext}" if len(groups) == 1 else f"{stem}-{i + 1:05d}-of-{len(groups):05d}.{ext}"
        if zeros:
            if fmt != "safetensors":
                raise SystemExit("--fill zeros writes safetensors only (this shape ships .bin shards)")
            nbytes = write_sparse_safetensors(os.path.join(out, fname), group, dtype)
            weight_map.update({name: fname for name, _ in group})
            print(f"  {fname}: {len(group)} tensors, {nbytes / GIB:.2f} GiB of zeros (sparse)")
            continue
        state = {name: draw(name, shape, DTYPES[dtype], gen) for name, shape in group}
        if fmt == "safetensors":
            save_file(state, os.path.join(out, fname), metadata={"format": "pt"})
        else:
            torch.save(state, os.path.join(out, fname))
        weight_map.update({name: fname for name, _ in group})
        print(f"  {fname}: {len(group)} tensors, {sum(t.numel() * t.element_size() for t in state.values()) / GIB:.2f} GiB")
        del state
    if len(groups) > 1:
        index = f"{stem}.{ext}.index.json"
        with open(os.path.join(out, index), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def preprocessor(out, size):
    write_json(os.path.join(out, "preprocessor_config.json"), {
        "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": size}})


def tokenizer(out, path, llava_hf):
    if not path:
        return
    shutil.copy(path, os.path.join(out, "tokenizer.model"))
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": False}
    if llava_hf:
        write_json(os.path.join(out, "added_tokens.json"), {"<image>": 32000, "<pad>": 32001})
        config["pad_token"] = "<pad>"
    write_json(os.path.join(out, "tokenizer_config.json"), config)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=["llava-hf-7b", "liuhaotian-7b", "tinyllama", "llama-7b"])
    ap.add_argument("dtype", choices=list(DTYPES))
    ap.add_argument("out")
    ap.add_argument("--tokenizer", help="a LLaMA SentencePiece tokenizer.model to copy in")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fill", choices=["random", "zeros"], default="random")
    args = ap.parse_args()
    zeros = args.fill == "zeros"
    gen = torch.Generator().manual_seed(args.seed)
    out = args.out
    os.makedirs(out, exist_ok=True)
    print(f"writing {args.shape} ({args.dtype}) to {out}")
    if args.shape == "llava-hf-7b":
        config = llava_hf_config(args.dtype)
        write_json(os.path.join(out, "config.json"), config)
        tensors = shapes_of(LlavaForConditionalGeneration, LlavaConfig(**config))
        write_shards(out, tensors, args.dtype, 3, "safetensors", gen, zeros)
        preprocessor(out, 336)
        tokenizer(out, args.tokenizer, True)
    elif args.shape == "liuhaotian-7b":
        config = llama_7b_config(args.dtype)
        config.update({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
                       "mm_vision_tower": "clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
                       "mm_hidden_size": 1024, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
                       "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
                       "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "use_mm_proj": True,
                       "max_position_embeddings": 4096})
        write_json(os.path.join(out, "config.json"), config)
        tensors = shapes_of(LlamaForCausalLM, LlamaConfig(**llama_7b_config(args.dtype)))
        tensors += [("model.mm_projector.0.weight", (4096, 1024)), ("model.mm_projector.0.bias", (4096,)),
                    ("model.mm_projector.2.weight", (4096, 4096)), ("model.mm_projector.2.bias", (4096,))]
        write_shards(out, tensors, args.dtype, 2, "bin", gen)
        tokenizer(out, args.tokenizer, False)
        clip = os.path.join(out, "clip-vit-large-patch14-336")
        os.makedirs(clip, exist_ok=True)
        clip_config = clip_336_config()
        clip_config.save_pretrained(clip)
        write_shards(clip, shapes_of(CLIPModel, clip_config), "f32", 1, "safetensors", gen)
        preprocessor(clip, 336)
    elif args.shape == "tinyllama":
        config = tinyllama_config(args.dtype)
        write_json(os.path.join(out, "config.json"), config)
        write_shards(out, shapes_of(LlamaForCausalLM, LlamaConfig(**config)), args.dtype, 1, "safetensors", gen, zeros)
        tokenizer(out, args.tokenizer, False)
    else:
        config = llama_7b_config(args.dtype)
        write_json(os.path.join(out, "config.json"), config)
        write_shards(out, shapes_of(LlamaForCausalLM, LlamaConfig(**config)), args.dtype, 2, "safetensors", gen, zeros)
        tokenizer(out, args.tokenizer, False)
    print("done")


if __name__ == "__main__":
    main()
