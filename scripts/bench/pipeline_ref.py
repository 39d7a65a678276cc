#!/usr/bin/env python3
"""The reference input pipeline, timed: llava-torch 1.2.2.post1's LazySupervisedDataset (PIL decode,
CLIPImageProcessor, conversation template, slow LlamaTokenizer, label masking) read through a torch
DataLoader with N worker processes, as the reference trainer does. Prints one JSON line.

Usage: PYTHONPATH=.venv-ref .venv/bin/python scripts/bench/pipeline_ref.py DATA.json IMAGE_DIR TOKENIZER.model TEMPLATE EPOCHS WORKERS
"""
import json
import sys
import time

import torch
import transformers
from llava import conversation as conversation_lib
from llava.train.train import LazySupervisedDataset


class DataArgs:
    lazy_preprocess = True
    is_multimodal = True
    image_aspect_ratio = "square"
    mm_use_im_start_end = False


def main():
    data, images, model, template, epochs, workers = sys.argv[1:7]
    torch.set_num_threads(1)
    tok = transformers.LlamaTokenizer(model, legacy=True, model_max_length=2048, padding_side="right")
    tok.pad_token = tok.unk_token
    conversation_lib.default_conversation = conversation_lib.conv_templates[template]
    args = DataArgs()
    args.image_folder = images
    args.image_processor = transformers.CLIPImageProcessor(size=224, crop_size=224)
    ds = LazySupervisedDataset(data, tok, args)
    full = torch.utils.data.ConcatDataset([ds] * int(epochs))
    loader = torch.utils.data.DataLoader(full, batch_size=None, num_workers=int(workers), shuffle=False)
    start = time.perf_counter()
    n = 0
    for item in loader:
        n += 1
    secs = time.perf_counter() - start
    print(json.dumps({"samples": n, "seconds": secs, "samples_per_s": n / secs}))


if __name__ == "__main__":
    main()
