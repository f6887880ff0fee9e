"""lm-evaluation-harness's model interface around a lowbit CausalLM (imports lm_eval: the "eval" extra).

Scoring: a request's tokens are context + continuation; the continuation's tokens are the targets. Targets
are cut into windows of at most block_size, scored from the end backwards, each window with as much of the
preceding text as fits (a continuation within the window: one forward pass over the last block_size tokens,
as lm-eval's own HF model does; a longer one: disjoint windows, as its rolling perplexity does). Windows are
batched longest first, right-padded (causal attention: padding never reaches a scored position; with
per-tensor quantization under --recipe the padded batch shares its scales, as a batched server's would).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from tqdm.auto import tqdm

from lowbit.train.runtime import autocast


def windows(n_tokens: int, n_targets: int, block: int) -> list[tuple[int, int, int]]:
    """(input start, first target, end) per window: the input is tokens[start:end-1], which predicts
    tokens[start+1:end]; the window scores targets [first, end). Targets are the last n_targets tokens."""
    first = n_tokens - n_targets
    if first < 1:
        raise ValueError("a scored token needs at least one token before it")
    out, end = [], n_tokens
    while end > first:
        lo = max(first, end - block)
        out.append((max(0, end - 1 - block), lo, end))
        end = lo
    return out


class LowbitLM(TemplateLM):
    """`model`: a lowbit CausalLM (eval mode, on its device); `tokenizer`: lowbit.data.Tokenizer; `recipe`: the
    autocast recipe (fp32 master weights by default). `batch_size`: windows per forward pass."""

    def __init__(self, model, tokenizer, recipe, batch_size: int = 16, max_gen_toks: int = 64,
                 progress: bool = True):
        super().__init__()
        self.model, self.tok, self.recipe = model, tokenizer, recipe
        self._device = next(model.parameters()).device
        self.block = model.config.block_size
        self.batch_size, self.max_gen_toks, self.progress = batch_size, max_gen_toks, progress

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    def tok_encode(self, string: str, add_special_tokens=None, **kw) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    def score(self, jobs: list[tuple[list[int], int]], desc: str = "scoring") -> list[tuple[float, bool]]:
        """jobs: (tokens, n_targets) -> (sum of the targets' log-probabilities, all targets greedy) each."""
        pieces = [(j, toks[s:e - 1], toks[lo:e], e - lo) for j, (toks, n) in enumerate(jobs)
                  for s, lo, e in windows(len(toks), n, self.block)]
        pieces.sort(key=lambda p: -len(p[1]))  # longest first: little padding per batch
        logp, greedy = [0.0] * len(jobs), [True] * len(jobs)
        bar = tqdm(total=len(pieces), desc=desc, disable=not self.progress, leave=False)
        for b in range(0, len(pieces), self.batch_size):
            batch = pieces[b: b + self.batch_size]
            for (j, _, _, _), (lp, g) in zip(batch, self._forward(batch)):
                logp[j] += lp
                greedy[j] &= g
            bar.update(len(batch))
        bar.close()
        return list(zip(logp, greedy))

    @torch.no_grad()
    def _forward(self, batch) -> list[tuple[float, bool]]:
        width = max(len(p[1]) for p in batch)
        x = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
        for r, p in enumerate(batch):
            x[r, :len(p[1])] = torch.tensor(p[1])
        with autocast(self.recipe, self._device):
            logits, _ = self.model(x.to(self._device))
        out = []
        for r, (_, inp, targets, n) in enumerate(batch):
            lp = F.log_softmax(logits[r, len(inp) - n: len(inp)].float(), dim=-1)
            t = torch.tensor(targets[-n:], device=lp.device)
            out.append((float(lp.gather(1, t[:, None]).sum()), bool((lp.argmax(-1) == t).all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw) -> list[tuple[float, bool]]:
        return self.score([(ctx + cont, len(cont)) for _, ctx, cont in requests], "loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, its first token predicted from end-of-text."""
        jobs = [([self.eot_token_id] + self.tok_encode(r.args[0]), len(self.tok_encode(r.args[0])))
                for r in requests]
        return [lp for lp, _ in self.score(jobs, "rolling loglikelihood")]

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut at the first of its `until` strings."""
        out = []
        for r in tqdm(requests, desc="generating", disable=not self.progress, leave=False):
            context, kwargs = r.args
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else until
            ids = (self.tok_encode(context) or [self.eot_token_id])[-self.block:]
            new = []
            with autocast(self.recipe, self._device):
                for nxt in self.model.stream(torch.tensor([ids], device=self._device),
                                             int(kwargs.get("max_gen_toks", self.max_gen_toks)), temperature=0.0):
                    new.append(int(nxt))
                    if any(u in self.tok_decode(new) for u in until) or int(nxt) == self.eot_token_id:
                        break
            text = self.tok_decode(new)
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out
