"""Removing modalities (tokenloom.modalities.remove_modalities, `tokenloom remove-modality`): the inverse of
add_modality. Checked: a model grown by video and speech through experts, its experts and new rows then
changed as a training run changes them, gives back its base bit for bit; removing speech alone keeps video's
experts and every logit of the ids kept; the ids must be the vocabulary's last; the CLI's errors."""

import json

import pytest
import torch

import tokenloom
from tokenloom.cli import main
from tokenloom.modalities import add_modality, new_token_rows, remove_modalities
from tokenloom.vocab import VocabularyError


@pytest.fixture(scope="module")
def grown(old_pipe, speech_pipe):
    """old_pipe grown by video then speech through experts with their own head, every weight a run with
    `train.trainable: experts` trains then moved (the experts, the expert head, the new rows)."""
    pipe = add_modality(old_pipe, "video", experts=True, expert_scope="rest", expert_head=True)
    pipe = add_modality(pipe, "speech", speech_pipe.speech_tokenizer, experts=True)
    new = new_token_rows(pipe.vocab, ["video", "speech"])
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, weight in pipe.model.named_parameters():
            noise = torch.randn(weight.shape, generator=generator) * 0.1
            if ".expert." in name or name.startswith("expert_"):
                weight.add_(noise)
            elif name in ("tok_embeddings.weight", "output.weight"):
                weight[new] += noise[new]
    return pipe


def test_a_model_grown_through_experts_gives_back_its_base_bit_for_bit(grown, old_pipe):
    assert grown.model.config.experts == ["video", "speech"] and grown.model.config.expert_head
    base = remove_modalities(grown, ["video", "speech"])  # in either order: the last-added goes first
    assert base.vocab == old_pipe.vocab and base.speech_tokenizer is None
    assert base.model.config == old_pipe.model.config
    want = old_pipe.model.state_dict()
    got = base.model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert grown.vocab.size > old_pipe.vocab.size  # and the grown pipeline is left as it was
    assert remove_modalities(grown, ["speech", "video"]).vocab == base.vocab


def test_removing_speech_keeps_the_video_experts_and_the_kept_ids_logits(grown):
    video = remove_modalities(grown, ["speech"])
    config = video.model.config
    assert config.experts == ["video"] and config.expert_head and config.expert_scope == "rest"
    assert video.vocab.has_video and not video.vocab.has_speech and video.speech_tokenizer is None
    assert video.vocab.size == grown.vocab.size - 2 - len(grown.vocab.speech_code_ids)
    ids = torch.tensor([[*range(0, 60, 4), grown.vocab.video_begin, *range(1, 60, 4), grown.vocab.video_end, 9]])
    with torch.no_grad():
        torch.testing.assert_close(video.model(ids), grown.model(ids)[..., : video.vocab.size], rtol=0, atol=0)


def test_the_ids_removed_must_be_the_vocabularys_last(grown, old_pipe):
    with pytest.raises(VocabularyError, match="video ids .* not the vocabulary's last: speech ids come after"):
        remove_modalities(grown, ["video"])
    with pytest.raises(VocabularyError, match="has no video tokens"):
        remove_modalities(old_pipe, ["video"])
    with pytest.raises(VocabularyError, match="unknown modality 'audio'"):
        remove_modalities(grown, ["audio"])


def test_cli_writes_the_base_and_rejects_bad_modalities(grown, old_pipe, tmp_path, capsys):
    grown.save_pretrained(tmp_path / "grown")
    out = tmp_path / "base"
    assert main(["remove-modality", str(tmp_path / "grown"), str(out), "--modality", "speech,video"]) == 0
    assert tokenloom.load(out).vocab == old_pipe.vocab and not (out / "speech_codec.json").exists()
    record = json.loads((out / "config.json").read_text())["removed_modalities"]
    assert record["modalities"] == ["speech", "video"]
    assert record["removed_ids"] == [old_pipe.vocab.size, grown.vocab.size]
    capsys.readouterr()
    for argv, message in [(["--modality", "vid"], "unknown ['vid']"),
                          (["--modality", "video"], "remove speech first")]:
        assert main(["remove-modality", str(tmp_path / "grown"), str(tmp_path / "other"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, (argv, err)
    assert not (tmp_path / "other").exists()  # nothing half-written
