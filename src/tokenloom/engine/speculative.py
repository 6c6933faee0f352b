"""Speculative Jacobi decoding (SJD, Teng et al., ICLR 2025) for image codes, per row of a batch.

A row drawing an image feeds, after its token, a window of draft codes; one forward scores them all.
The next step verifies the drafts in order: draft x, drawn from a proposal q, is accepted with
probability min(1, p(x) / q(x)), p being the model's distribution (guidance, temperature, top-k and
top-p applied, exactly what plain decoding samples) given the accepted prefix; at the first rejection
the code is drawn from the residual max(0, p - q), normalised, and the rest of the window is
dropped; when every draft is accepted the next code is drawn from p after the last one. Whatever q
is, the codes kept are samples of p (the speculative-sampling theorem), so output follows the same
distribution as plain decoding, and greedy decoding gives the same codes.

Jacobi: the proposals of the positions after a rejection are the distributions the same forward
computed there (conditioned on drafts that turned out wrong, but usually close): draws from them
are the next drafts. Positions new to the window start from `init`: "random" (uniform over the
codes, as SJD starts), or "above" (the code one row up, else the one to the left: a one-hot
proposal; images repeat their rows far more often than chance; in a video's later frames, the code
at the same place in the frame before: consecutive frames repeat each other more than their rows).

Each row accepts its own number of codes; its KV cache "rolls back" by moving its next slot to
the first rejected draft (the key mask hides slots past it until they are written again).
End-of-line and image end are drafts the grammar forces (q one-hot, always accepted); a window
never runs past the image end, so every code drawn here is drawn with the image's sampling. A
video's frames are images to this: a window never runs past a frame's end either. Speech is not
speculated: inside an utterance `Grammar.lookahead` knows nothing ahead (its length is the model's
choice, and nothing like an image's rows repeats), so a speculative request draws speech codes one a
step, exactly as a plain one does.
"""

from __future__ import annotations

import torch

METHODS = ("jacobi",)
INITS = ("random", "above")
MAX_WINDOW = 63  # drafts per row and step (the window plus the row's token stays a decode step)


def check_speculative(method, window, init, what: str) -> None:
    if method is not None and method not in METHODS:
        raise ValueError(f"{what}: speculative must be one of {METHODS} or None, got {method!r}")
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
        raise ValueError(f"{what}: speculative_window must be an integer in 1..{MAX_WINDOW}, got {window!r}")
    if init not in INITS:
        raise ValueError(f"{what}: speculative_init must be one of {INITS}, got {init!r}")


def accepted_lengths(p: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor, n: torch.Tensor,
                     u: torch.Tensor) -> torch.Tensor:
    """How many leading drafts each row accepts. p [S, K+1, V] (p[:, j] scores draft j), drafts [S, K],
    q [S, K, V] their proposals, n [S] drafts per row (the rest is padding), u [S, K] uniforms."""
    k = drafts.shape[1]
    p_x = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    q_x = q.gather(-1, drafts[..., None]).squeeze(-1)
    ok = (u * q_x < p_x) & (torch.arange(k, device=n.device)[None] < n[:, None])  # u < p/q, q(x) > 0
    return ok.long().cumprod(-1).sum(-1)


def next_distribution(p: torch.Tensor, q: torch.Tensor, a: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """[S, V]: what the code after the accepted ones is drawn from: the residual max(0, p - q),
    normalised, at the first rejected draft, or p after the last draft when all were accepted."""
    rows = torch.arange(p.shape[0], device=p.device)
    p_a = p[rows, a]
    rejected = a < n
    q_a = q[rows, a.clamp(max=max(q.shape[1] - 1, 0))] if q.shape[1] else torch.zeros_like(p_a)
    residual = (p_a - q_a * rejected[:, None]).clamp(min=0)
    total = residual.sum(-1, keepdim=True)
    # Rounding can leave nothing (p == q to float precision); then the rejection had no mass to
    # correct and p itself is the right draw.
    return torch.where(total > 0, residual / total.clamp(min=1e-30), p_a)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One sample per row of probs [m, V] (a row's own generator: batch-independent)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_window(carry: torch.Tensor | None, eol: list[bool], codes: list[int], width: int, init: str,
                uniform: torch.Tensor, code_ids: torch.Tensor, end_of_line: int | None,
                generator: torch.Generator | None, prior: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """One row's drafts for its next window and their proposals [k, V], k = len(eol) (True where the
    grammar forces end-of-line). The first positions draw from `carry` (Jacobi: the distributions the
    last forward computed there), the rest start from `init` after this image's `codes` (token ids,
    row-major, `width` per row); `uniform` is the uniform proposal over the codes; `prior`: the frame
    before in a video (token ids, row-major), which "above" copies."""
    k = len(eol)
    q = torch.zeros((k, uniform.numel()), device=uniform.device)
    c = 0 if carry is None else min(len(carry), k)
    drafts: list[int] = []
    if c:
        q[:c] = carry[:c]
        drafts = draw(carry[:c], generator).tolist()
    grid = list(codes) + [d for d, forced in zip(drafts, eol) if not forced]
    for j in range(c, k):
        if eol[j]:
            drafts.append(end_of_line)
            q[j, end_of_line] = 1.0
            continue
        i = len(grid)
        guess = None
        if init == "above" and prior:
            guess = prior[i]
        elif init == "above" and i:
            guess = grid[i - width] if i >= width else grid[i - 1]
        if guess is None:
            guess = int(code_ids[torch.randint(len(code_ids), (1,), generator=generator, device=code_ids.device)])
            q[j] = uniform
        else:
            q[j, guess] = 1.0
        drafts.append(guess)
        grid.append(guess)
    return drafts, q
