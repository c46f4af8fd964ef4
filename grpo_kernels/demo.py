"""A real GRPO loop on a tiny random causal LM, on the CPU in about a minute.

``python -m grpo_kernels.demo [--steps N]``: builds a Qwen2 model from a config (vocab
32k so the vocabulary dominates, nothing downloaded), samples G completions per prompt,
rewards completions for using token ids from the lower half of the vocabulary, turns
rewards into group advantages, and trains with ``grpo_loss`` (k3 KL against a frozen
copy of the initial model, whose log-probs come from ``token_logprobs``) on the model's
last hidden states and ``lm_head.weight``. Prints the mean reward as it rises and the
loss's peak memory next to the materialized reference's.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from grpo_kernels import backend_for, group_advantages, grpo_loss, token_logprobs
from grpo_kernels.memory import peak_memory_bytes

VOCAB = 32768
TARGET_IDS = VOCAB // 2  # reward: fraction of completion tokens with id < TARGET_IDS


def build_model(seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    # a peaked head, like a trained LM's (a few nats of entropy, not log(V)): sampled
    # completions then differ in a few likely tokens, which GRPO's group baseline compares
    torch.nn.init.normal_(model.lm_head.weight, std=0.6)
    return model


def reward_fn(completions: torch.Tensor) -> torch.Tensor:
    return (completions < TARGET_IDS).float().mean(-1)


@torch.no_grad()
def sample(model, prompts: torch.Tensor, num_generations: int, length: int, temperature: float):
    """G completions per prompt, [P*G, length], by plain ancestral sampling with a KV cache."""
    ids = prompts.repeat_interleave(num_generations, 0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                         top_k=0, top_p=1.0, max_new_tokens=length, min_new_tokens=length, pad_token_id=0,
                         eos_token_id=None)
    return ids, out[:, ids.shape[1]:]


def completion_hidden(model, prompt_ids, completion_ids):
    """Last hidden states that predict each completion token, [B, T, H]."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    hidden = model.model(input_ids=ids).last_hidden_state
    P, T = prompt_ids.shape[1], completion_ids.shape[1]
    return hidden[:, P - 1 : P - 1 + T]


def memory_comparison(model, prompt_ids, completion_ids, advantages, mask):
    """Peak bytes of one loss forward+backward: ours vs the materialized reference."""
    hidden = completion_hidden(model, prompt_ids, completion_ids).detach()
    weight = model.lm_head.weight
    figures = {}
    for backend in ("auto", "reference"):
        h = hidden.clone().requires_grad_(True)

        def step():
            grpo_loss(h, weight, completion_ids, advantages, mask, backend=backend).backward()

        step()  # warm-up: imports and allocator paths
        figures[backend] = peak_memory_bytes(step, h.device)
        weight.grad = None
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model = build_model(args.seed)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    print(f"Tiny Qwen2 (vocab {VOCAB}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params); "
          f"{args.prompts} prompts x {args.generations} completions x {args.length} tokens per step")
    print(f"reward = fraction of completion tokens with id < {TARGET_IDS}; beta = {args.beta} KL to the initial model")
    name, why = backend_for("cpu", torch.float32)  # may build the C++ CPU kernels, once
    print(f"backend: {name} ({why})", flush=True)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    start, history = time.time(), []
    for step in range(1, args.steps + 1):
        prompts = torch.randint(0, VOCAB, (args.prompts, 6), generator=g)
        model.eval()
        prompt_ids, completion_ids = sample(model, prompts, args.generations, args.length, temperature=1.0)
        rewards = reward_fn(completion_ids)
        advantages = group_advantages(rewards, args.generations)
        mask = torch.ones_like(completion_ids, dtype=torch.bool)
        with torch.no_grad():  # the reference model's pass: log-probs without [N, V] logits
            ref_logps = token_logprobs(completion_hidden(reference, prompt_ids, completion_ids),
                                       reference.lm_head.weight, completion_ids)
        model.train()
        hidden = completion_hidden(model, prompt_ids, completion_ids)
        loss, metrics = grpo_loss(hidden, model.lm_head.weight, completion_ids, advantages, mask,
                                  ref_logps=ref_logps, beta=args.beta, loss_type="dapo", return_metrics=True)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        history.append(rewards.mean().item())
        bar = "#" * int(40 * history[-1])
        print(f"step {step:3d}  reward {history[-1]:.3f}  kl {metrics.kl_mean.item():.4f}  "
              f"entropy {metrics.entropy_mean.item():.2f}  {time.time() - start:5.1f}s  {bar}", flush=True)

    first, last = sum(history[:5]) / len(history[:5]), sum(history[-5:]) / len(history[-5:])
    print(f"\nmean reward, first 5 steps {first:.3f} -> last 5 steps {last:.3f}")
    figures = memory_comparison(model, prompt_ids, completion_ids, advantages, mask)
    n_tok, mb = completion_ids.numel(), 2**20
    if figures["auto"] is not None:
        print(f"peak memory of one loss forward+backward ({n_tok} tokens x {VOCAB} vocab): "
              f"grpo_kernels {figures['auto'] / mb:.1f} MiB vs materialized reference "
              f"{figures['reference'] / mb:.1f} MiB ({figures['reference'] / max(figures['auto'], 1):.1f}x)")
    return history, figures


if __name__ == "__main__":
    main()
