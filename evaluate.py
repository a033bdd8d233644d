"""
Generate long continuations from held-out prompts and measure them (the paper's tables).

    python evaluate.py results/reference            # all decoding modes, defaults below
    python evaluate.py --help

Generation and every metric live here; hyperfit.py imports the few it needs for its
validation (sharpness on validation text and TTR of greedy continuations).
"""
import math

import torch

# -----------------------------------------------------------------------------
# generation


@torch.no_grad()
def generate(model, prompt_ids, new_tokens, batch_size=16, do_sample=False, temperature=1.0,
             top_p=1.0, top_k=0, logits_processor=None, seed=0, desc=None):
    """Continue each row of `prompt_ids` (LongTensor [P, T], equal-length prompts, no padding)
    by exactly `new_tokens` tokens with the KV cache, `batch_size` prompts at a time.

    EOS is suppressed (min_new_tokens) so every continuation has the same length and the
    metrics compare like with like, as in the paper's fixed-length continuations.
    Returns LongTensor [P, new_tokens] of generated ids (prompt not included)."""
    from tqdm.auto import tqdm
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if do_sample:
        torch.manual_seed(seed)  # seeded sampling: same prompts + seed -> same text
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    outputs = []
    batches = range(0, len(prompt_ids), batch_size)
    for start in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        batch = prompt_ids[start:start + batch_size].to(device)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if do_sample \
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = model.generate(
            input_ids=batch, attention_mask=torch.ones_like(batch),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
            logits_processor=LogitsProcessorList(logits_processor or []),
            use_cache=True, **sampling)
        outputs.append(out[:, batch.shape[1]:].cpu())
    model.train(was_training)
    return torch.cat(outputs)


# -----------------------------------------------------------------------------
# metrics


def type_token_ratio(ids, last=None):
    """Unique tokens / tokens, over the last `last` tokens if given (the paper uses the last 96)."""
    ids = list(ids)[-last:] if last else list(ids)
    return len(set(ids)) / len(ids) if ids else float("nan")


@torch.no_grad()
def token_statistics(model, ids, batch_size=8, temperature=1.0, reference_model=None):
    """Next-token statistics of `model` on the sequences `ids` (LongTensor [N, T]), averaged over
    every predicted position: loss (nats), perplexity, predictive entropy (nats), and the
    probability mass on the top-1/3/5 tokens. `temperature` rescales the logits first (used for
    the entropy-matched baseline). Returns a dict of floats."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = dict(loss=0.0, entropy=0.0, top1=0.0, top3=0.0, top5=0.0)
    count = 0
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float() / temperature
        targets = batch[:, 1:]
        logp = torch.log_softmax(logits, dim=-1)
        probs = logp.exp()
        top5 = probs.topk(5, dim=-1).values
        totals["loss"] += -logp.gather(-1, targets.unsqueeze(-1)).sum().item()
        totals["entropy"] += -(probs * logp).sum(-1).sum().item()
        totals["top1"] += top5[..., 0].sum().item()
        totals["top3"] += top5[..., :3].sum().item()
        totals["top5"] += top5.sum().item()
        count += targets.numel()
    model.train(was_training)
    stats = {k: v / count for k, v in totals.items()}
    stats["perplexity"] = math.exp(stats["loss"])
    return stats
