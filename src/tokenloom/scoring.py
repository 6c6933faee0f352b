"""Score replies under the model, and rerank drawn images with those scores.

Text-to-image reranking asks the model both ways whether a candidate fits its prompt: how likely the
prompt is as its reply to the caption question about the candidate, and how likely the candidate is
as its reply to the prompt. It keeps the candidate with the highest sum of the two per-token means,
the way DALL-E reranked with CLIP, with no second model.
"""

from __future__ import annotations

import torch

from .document import Document, ImagePart, TextPart

MAX_SCORED_ROWS = 16  # rows per forward pass
MAX_LOGITS = 1 << 26  # float32 logits computed at once (256 MiB): scored positions x vocabulary


@torch.inference_mode()
def reply_log_likelihoods(pipe, documents: list[Document]) -> list[float]:
    """Mean log-probability per token of each document's assistant reply (its training tokens).

    The reply's closing turn token is left out, so a reply is scored as the opening of what the model
    would say: a prompt that names fewer details than the model's own captions (no sizes, say) still
    ranks images.
    """
    for i, doc in enumerate(documents):
        if not any(turn.role == "assistant" for turn in doc.turns):
            raise ValueError(f"document {i} has no assistant reply to score")
    encoded = [pipe.format.encode(doc, add_eos=False) for doc in documents]
    model = pipe.model
    per_slice = max(1, MAX_LOGITS // model.config.vocab_size)
    means = []
    for start in range(0, len(encoded), MAX_SCORED_ROWS):
        chunk = encoded[start:start + MAX_SCORED_ROWS]
        length = max(len(e) for e in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)  # right padding: a causal model never reads it
        scored = torch.zeros(len(chunk), length, dtype=torch.bool)
        for row, e in enumerate(chunk):
            ids[row, :len(e)] = torch.tensor(e.ids)
            scored[row, :len(e)] = torch.tensor(e.loss_mask)
            scored[row, max(j for j, m in enumerate(e.loss_mask) if m)] = False  # the closing turn token
        ids, scored = ids.to(pipe.device), scored[:, 1:].to(pipe.device)
        hidden = model(ids[:, :-1], return_hidden=True)[scored]  # only positions that predict a scored token
        routed = model.routed(ids[:, :-1])
        routed = None if routed is None else routed[scored]
        targets = ids[:, 1:][scored]
        token_lp = torch.cat([
            model.project(hidden[i:i + per_slice], None if routed is None else routed[i:i + per_slice])
            .float().log_softmax(-1)
            .gather(-1, targets[i:i + per_slice, None])[:, 0] for i in range(0, len(targets), per_slice)])
        rows = torch.arange(len(chunk), device=scored.device)[:, None].expand_as(scored)[scored]
        totals = torch.zeros(len(chunk), device=scored.device).index_add_(0, rows, token_lp)
        means += (totals / scored.sum(1).clamp(min=1)).tolist()  # an empty reply scores 0
    return means


def rerank_scores(pipe, prompt: str, prompt_text: str, candidates: list[ImagePart]) -> list[float]:
    """Per candidate: mean log p(prompt | candidate, caption question) + mean log p(candidate | prompt_text).
    prompt_text is the user turn that drew the candidates (the prompt, with any resolution wording)."""
    captions = [Document.chat([("user", [c, TextPart(pipe.config.caption_prompt)]), ("assistant", [TextPart(prompt)])])
                for c in candidates]
    drawings = [Document.chat([("user", [TextPart(prompt_text)]), ("assistant", [c])]) for c in candidates]
    scores = reply_log_likelihoods(pipe, captions + drawings)
    return [a + b for a, b in zip(scores[:len(candidates)], scores[len(candidates):])]


def best_candidate(pipe, prompt: str, prompt_text: str, candidates: list[ImagePart | None]) -> int:
    """Index of the best-scoring candidate (None: the draw produced no image, never chosen if any did)."""
    drawn = [i for i, c in enumerate(candidates) if c is not None]
    if not drawn:
        return 0
    scores = rerank_scores(pipe, prompt, prompt_text, [candidates[i] for i in drawn])
    return drawn[max(range(len(drawn)), key=scores.__getitem__)]
