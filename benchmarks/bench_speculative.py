"""Tokens per target forward of speculative_generate with Token Recycling (CPU, fp32).

    python benchmarks/bench_speculative.py [--new 64]

A small random-weight Llama (2 layers, vocab 320, as in tests/integrations/test_speculative.py),
batch 4: (a) random prompts of lengths 9/4/7/2, (b) a repetitive prompt (a 5-token pattern
repeated). Also checks the tokens equal model.generate(do_sample=False)'s.
"""
import argparse
import time

import torch
import transformers

from posattn.integrations.transformers import speculative_generate
from posattn.tree import TokenRecycling


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    V = 320
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    lens = (9, 4, 7, 2)
    S = max(lens)
    ids = torch.randint(3, V, (4, S))
    mask = torch.ones_like(ids)
    for b, n in enumerate(lens):
        ids[b, :S - n] = 0
        mask[b, :S - n] = 0
    rep = torch.tensor([[11, 12, 13, 14, 15] * 6] * 4)
    for name, (x, m) in {"random prompts": (ids, mask), "repetitive prompt": (rep, torch.ones_like(rep))}.items():
        t0 = time.perf_counter()
        ref = model.generate(x, attention_mask=m, max_new_tokens=args.new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        t1 = time.perf_counter()
        out = speculative_generate(model, x, m, max_new_tokens=args.new, drafter=TokenRecycling(V), eos_token_id=None,
                                   pad_token_id=0, return_dict_in_generate=True)
        t2 = time.perf_counter()
        print(f"{name}: {sum(out.new_tokens)} tokens in {out.target_forwards} target forwards: "
              f"{out.tokens_per_forward:.2f} tokens per request per forward (plain greedy: 1.00); equal to generate: "
              f"{torch.equal(out.sequences, ref)}; wall {t2 - t1:.2f} s vs generate {t1 - t0:.2f} s")


if __name__ == "__main__":
    main()
