"""Teacher-forced copy accuracy of edits: how well a model copies the cells an edit leaves alone,
apart from how it edits. Research code (docs/experiments.md); not part of the installed package."""

from __future__ import annotations

import torch

from edit_codes import changed_cells
from tokenloom.document import Document, TextPart


@torch.inference_mode()
def edit_copy_accuracy(pipe, samples) -> dict[str, float]:
    """Teacher-forced top-1 accuracy of each edit's target codes, in the cells whose pixels the edit
    leaves untouched and in those it changes: how well the model copies, apart from how it edits."""
    hits = {"untouched": [0, 0], "changed": [0, 0]}
    for s in samples:
        before, after = s.images
        source, target = (pipe.encode_image(im, *im.size) for im in (before, after))
        doc = Document.chat([("user", [source, TextPart(s.prompt[1])]), ("assistant", [target])])
        encoded = pipe.format.encode(doc, add_eos=False)
        ids = torch.tensor(encoded.ids, device=pipe.device)
        scored = torch.tensor(encoded.loss_mask, dtype=torch.bool, device=pipe.device)[1:]
        scored &= pipe.vocab.is_code(ids[1:])  # the target's codes, row by row
        right = (pipe.model(ids[None, :-1])[0].argmax(-1) == ids[1:])[scored].reshape(target.codes.shape).cpu()
        changed = changed_cells(before, after, target.codes.shape)
        for key, cells in (("untouched", ~changed), ("changed", changed)):
            hits[key][0] += int(right.numpy()[cells].sum())
            hits[key][1] += int(cells.sum())
    return {key: right / max(total, 1) for key, (right, total) in hits.items()}
