"""Writes a diffusers Z-Image folder with random weights for a named bench
configuration (tiny / medium), so `zimage bench --model DIR` and
`bench/diffusers_bench.py --model DIR` time the very same weights on CPU.

    python3 bench/make_model.py --config medium --out /tmp/zimage-medium

The tokenizer is the tiny fixture's (tests/fixtures/tiny-turbo/tokenizer);
its ids fit any vocabulary of the configs. Reference-oracle only: never needed
to build, run or test the app.
"""

import argparse
import os
import shutil

import torch

from diffusers_bench import configs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="medium")
    ap.add_argument("--kind", default="turbo", choices=["turbo", "base"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Model

    torch.manual_seed(0)
    dit_cfg, text_cfg, vae_cfg = configs(args.config)
    transformer = ZImageTransformer2DModel(**dit_cfg)
    for p in (transformer.x_pad_token, transformer.cap_pad_token):
        torch.nn.init.normal_(p, std=0.02)
    text = Qwen3Model(text_cfg)
    vae = AutoencoderKL(**vae_cfg)
    shift = 3.0 if args.kind == "turbo" else 6.0
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    here = os.path.dirname(os.path.abspath(__file__))
    tok_dir = os.path.join(here, "..", "tests", "fixtures", "tiny-turbo", "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tokenizer, transformer=transformer)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    pipe.save_pretrained(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
