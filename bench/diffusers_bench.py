"""The reference side of `zimage bench`: the same Z-Image architecture with
random weights, run by diffusers (PyTorch), timed stage by stage the same way.

    python3 bench/diffusers_bench.py --config full --device cuda --width 1024 --height 1024 \
        --steps 8 --guidance 0 --tokens 100 --runs 2 --json out.json

`--config` is one of full / medium / tiny (the same shapes as `zimage bench
--config`), or `--model DIR` loads a diffusers folder (same weights as ours,
for the CPU comparison). Timing does not depend on the weight values. On GPU
the models run in bf16 with PyTorch's SDPA, as diffusers recommends; on CPU in
f32 with one thread (two threads are slower on these 2-core machines).
Pinned: diffusers 0.42.1, transformers 5.x, torch 2.x.
"""

import argparse
import json
import time

import torch


def configs(name):
    from transformers import Qwen3Config

    if name == "full":
        dit = dict()
        text = dict(vocab_size=151936, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, intermediate_size=9728)
        vae = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32)
    elif name == "medium":
        dit = dict(dim=768, n_layers=6, n_heads=6, n_kv_heads=6, cap_feat_dim=1024)
        text = dict(vocab_size=151936, hidden_size=1024, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=128, intermediate_size=3072)
        vae = dict(block_out_channels=[64, 128, 256, 256], layers_per_block=2, norm_num_groups=32)
    elif name == "tiny":
        dit = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6])
        text = dict(vocab_size=4096, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, intermediate_size=64)
        vae = dict(block_out_channels=[8, 16, 32, 32], layers_per_block=1, norm_num_groups=4)
    else:
        raise SystemExit(f"unknown config {name}")
    dit.setdefault("axes_lens", [1536, 512, 512])
    text_cfg = Qwen3Config(rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
                           tie_word_embeddings=True, attention_bias=False, **text)
    vae_cfg = dict(in_channels=3, out_channels=3, latent_channels=16,
                   down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                   act_fn="silu", mid_block_add_attention=True, use_quant_conv=False,
                   use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159, **vae)
    return dit, text_cfg, vae_cfg


def build(args, device, dtype):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    t0 = time.perf_counter()
    if args.model:
        pipe = ZImagePipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
        text = pipe.text_encoder
    else:
        dit_cfg, text_cfg, vae_cfg = configs(args.config)
        torch.set_default_dtype(dtype)
        with torch.device(device):
            transformer = ZImageTransformer2DModel(**dit_cfg)
            for p in (transformer.x_pad_token, transformer.cap_pad_token):
                torch.nn.init.normal_(p, std=0.02)
            text = Qwen3Model(text_cfg)
            vae = AutoencoderKL(**vae_cfg)
        torch.set_default_dtype(torch.float32)
        shift = 3.0 if args.kind == "turbo" else 6.0
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
        pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=None, transformer=transformer)
    sync(device)
    return pipe, text, (time.perf_counter() - t0) * 1e3


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="full")
    ap.add_argument("--model")
    ap.add_argument("--kind", default="turbo", choices=["turbo", "base"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    ap.add_argument("--json")
    args = ap.parse_args()

    steps = args.steps or (8 if args.kind == "turbo" else 50)
    guidance = args.guidance if args.guidance is not None else (0.0 if args.kind == "turbo" else 4.0)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True

    with torch.no_grad():
        pipe, text, load_ms = build(args, device, dtype)
        vocab = text.config.vocab_size
        ids = torch.randint(0, vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(device)
        neg_ids = ids[:, : max(8, args.tokens // 4)]

        def one(record):
            times = {}
            start = time.perf_counter()
            emb = text(input_ids=ids, output_hidden_states=True).hidden_states[-2][0]
            neg = text(input_ids=neg_ids, output_hidden_states=True).hidden_states[-2][0] if guidance > 0 else None
            sync(device)
            times["text"] = (time.perf_counter() - start) * 1e3
            step_times = []
            last = [time.perf_counter()]

            def on_step(_pipe, i, t, kw):
                if record:
                    sync(device)
                    now = time.perf_counter()
                    step_times.append((now - last[0]) * 1e3)
                    last[0] = now
                return {}

            t_loop = time.perf_counter()
            last[0] = t_loop
            latents = pipe(prompt_embeds=[emb], negative_prompt_embeds=[neg] if neg is not None else None,
                           height=args.height, width=args.width, num_inference_steps=steps, guidance_scale=guidance,
                           generator=torch.Generator().manual_seed(0), output_type="latent",
                           callback_on_step_end=on_step).images
            sync(device)
            t_vae = time.perf_counter()
            z = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            pipe.vae.decode(z, return_dict=False)[0].float().cpu()
            sync(device)
            times["vae"] = (time.perf_counter() - t_vae) * 1e3
            times["steps"] = step_times
            times["total"] = (time.perf_counter() - start) * 1e3
            return times

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        first = one(False)
        best = None
        for _ in range(max(1, args.runs)):
            r = one(True)
            if best is None or r["total"] < best["total"]:
                best = r
    report = {
        "model": f"{args.model or args.config} (diffusers)",
        "device": f"{device} ({str(dtype).replace('torch.', '')}, torch {torch.__version__}, {torch.get_num_threads()} threads)",
        "width": args.width, "height": args.height, "steps": steps, "guidance": guidance,
        "prompt_tokens": args.tokens, "load_ms": load_ms, "first_run_ms": first["total"],
        "text_encode_ms": best["text"], "dit_step_ms": best["steps"],
        "dit_step_mean_ms": sum(best["steps"]) / max(1, len(best["steps"])),
        "vae_decode_ms": best["vae"], "end_to_end_ms": best["total"],
        "peak_device_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "runs": max(1, args.runs),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
