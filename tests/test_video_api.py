"""Video through the pipeline, the command line and the evaluation, on the small random pipeline."""

import json

import numpy as np
import pytest
from PIL import Image

from tokenloom.cli import main
from tokenloom.document import VideoPart
from tokenloom.evaluation import default_tasks, evaluate
from tokenloom.video_io import read_video, write_video
from tokenloom.world.video import Motion, Video, render_video

SIDE = 32  # the random pipeline's image size


@pytest.fixture(scope="module")
def model_dir(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(path)
    return path


def _video(frames: int = 4) -> Video:
    motion = Motion("red", "circle", "large", "left", "right", frames)
    return Video([f.resize((SIDE, SIDE)) for f in render_video(motion)])


def test_generate_videos_is_seeded_and_well_formed(pipe) -> None:
    a = pipe.generate_videos(["a red circle moves from the left to the right", "x"], frames=3, seed=5)
    b = pipe.generate_videos(["a red circle moves from the left to the right", "x"], frames=3, seed=5)
    assert [len(v) for v in a] == [3, 3] and all(f.size == (SIDE, SIDE) for v in a for f in v)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for v, w in zip(a, b) for x, y in zip(v, w))
    # the same draw as a chat request of mode "video" with that seed
    result = pipe.chat("x", mode="video", video_frames=3, seed=6)
    assert np.array_equal(np.asarray(result.videos[0][2]), np.asarray(a[1][2]))
    with pytest.raises(ValueError, match="frames"):
        pipe.generate_videos("x", frames=0)


def test_videos_are_told_from_images_everywhere(pipe, tmp_path) -> None:
    video = _video()
    write_video(video, tmp_path / "clip.gif")
    write_video(video, tmp_path / "frames")
    video[0].save(tmp_path / "still.png")
    for x in (video, pipe.encode_video(video), tmp_path / "clip.gif", str(tmp_path / "frames")):
        assert pipe.is_video(x)
    assert not pipe.is_video(tmp_path / "still.png") and not pipe.is_video(video[0])
    doc = pipe.user_document("Describe the video.", tmp_path / "clip.gif")
    assert isinstance(doc.parts[0], VideoPart) and doc.parts[0].num_frames == 4
    # one video is one caption; a list of a video and an image is two
    assert isinstance(pipe.caption(video, max_new_tokens=3), str)
    assert len(pipe.caption([video, video[0]], max_new_tokens=3)) == 2
    with pytest.raises(ValueError, match="one size"):
        pipe.encode_video([video[0], video[1].resize((48, 32))])


def test_generate_video_verb(model_dir, tmp_path, capsys) -> None:
    base = ["--model", str(model_dir), "--frames", "3", "--seed", "1"]
    assert main(["generate-video", "a red circle moves", "--out", str(tmp_path / "v.gif"), *base]) == 0
    assert len(read_video(tmp_path / "v.gif")) == 3
    assert main(["generate-video", "a red circle moves", "--out", str(tmp_path / "frames"), *base]) == 0
    assert len(read_video(tmp_path / "frames")) == 3
    cases = [(["--out", str(tmp_path / "v.mp4")], "unknown video extension"),
             (["--out", str(tmp_path / "w.gif"), "--fps", "500"], "--fps must be"),
             (["--out", str(tmp_path / "w.gif"), "--frames", "300"], "1 to 64 frames"),
             (["--out", str(tmp_path / "w.gif"), "--frames", "60", "--width", "256", "--height", "256"], "context")]
    for extra, message in cases:
        capsys.readouterr()
        args = ["generate-video", "x", "--model", str(model_dir), *extra]
        assert main(args) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "w.gif").exists()


def test_caption_ask_and_chat_take_video_files(model_dir, tmp_path, capsys) -> None:
    video = _video()
    write_video(video, tmp_path / "clip.gif")
    write_video(video[:1], tmp_path / "one.gif")
    model = ["--model", str(model_dir), "--seed", "0"]
    assert main(["caption", str(tmp_path / "clip.gif"), *model]) == 0
    assert main(["ask", str(tmp_path / "clip.gif"), "Where does the red circle start?", *model]) == 0
    assert main(["caption", str(tmp_path / "one.gif"), *model]) == 0  # one frame: an image
    out = tmp_path / "chat"
    assert main(["chat", "Describe the video.", "--video", str(tmp_path / "clip.gif"), "--out", str(out),
                 "--max-new-tokens", "4", *model]) == 0
    page = (out / "index.html").read_text()
    assert 'src="video_000.gif"' in page and len(read_video(out / "video_000.gif")) == 4
    capsys.readouterr()
    assert main(["chat", "x", "--video", str(tmp_path / "one.gif"), "--out", str(out), *model]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_eval_scores_the_video_tasks(pipe, tmp_path) -> None:
    assert set(default_tasks(pipe)) >= {"t2v", "next_frames", "video_caption", "video_qa"}
    report = evaluate(pipe, tmp_path, n=2, tasks=["t2v", "next_frames", "video_caption", "video_qa"],
                      batch_size=4, progress=False)
    assert set(report["scores"]) == {"t2v", "next_frames", "video_caption", "video_qa"}
    assert all(0.0 <= s <= 1.0 for s in report["scores"].values())
    t2v = report["details"]["t2v"]
    assert len(t2v) == 2 and all(r["frames"] == 6 and not r["right"] for r in t2v)  # random weights draw noise
    with Image.open(tmp_path / "videos-t2v.png") as grid:
        assert grid.size[0] > 6 * 64  # a row of six framed 64x64 frames
    assert json.loads((tmp_path / "report.json").read_text())["n"] == 2


def test_eval_refuses_video_tasks_without_video_tokens(tmp_path, old_pipe) -> None:
    assert "t2v" not in default_tasks(old_pipe)
    with pytest.raises(ValueError, match="need a model with video tokens"):
        evaluate(old_pipe, tmp_path, n=1, tasks=["t2v"])


def test_the_server_answers_a_video_as_an_animated_gif(tmp_path) -> None:
    import base64

    from tokenloom.document import Document, TextPart
    from tokenloom.serve import answer_content

    video = _video()
    part = VideoPart(np.zeros((4, 4, 4), np.int64), pixels=list(video))
    content = answer_content(Document.from_parts([TextPart("here"), part]))
    assert content[0] == {"type": "text", "text": "here"} and content[1]["type"] == "image_url"
    url = content[1]["image_url"]["url"]
    assert url.startswith("data:image/gif;base64,")
    (tmp_path / "answer.gif").write_bytes(base64.b64decode(url.split(",", 1)[1]))
    back = read_video(tmp_path / "answer.gif")
    assert len(back) == 4 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(back, video))


def test_the_server_reads_an_animated_gif_in_a_message_as_a_video(tmp_path, pipe, old_pipe) -> None:
    """What the server answers videos as, it reads back as a video: the prompt holds the video span."""
    import base64

    import openai

    from tokenloom.document import Document, TextPart
    from tokenloom.serve import ServerThread, ServeSettings, create_app
    from tokenloom.video_io import animation_bytes

    video = list(_video(3))
    gif = "data:image/gif;base64," + base64.b64encode(animation_bytes(video)).decode("ascii")
    message = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": gif}},
                                            {"type": "text", "text": "Describe the video."}]}]
    expected = Document.chat([("user", [pipe.encode_video(video), TextPart("Describe the video.")])])
    assert expected.videos[0].num_frames == 3
    pipe.save_pretrained(tmp_path / "video")
    old_pipe.save_pretrained(tmp_path / "old")
    with ServerThread(create_app(ServeSettings(model=str(tmp_path / "video")))) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60.0)
        model = c.models.list().data[0].id
        r = c.chat.completions.create(model=model, messages=message, max_tokens=3, seed=0)
        assert r.usage.prompt_tokens == len(pipe.chat_request(expected, mode="text").prompt_ids)
        # a still GIF stays an image: its prompt is one image span shorter than three frames
        still = "data:image/gif;base64," + base64.b64encode(animation_bytes(video[:1])).decode("ascii")
        r1 = c.chat.completions.create(model=model, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": still}}]}], max_tokens=1, seed=0)
        image_doc = Document.chat([("user", [pipe.encode_image(video[0])])])
        assert r1.usage.prompt_tokens == len(pipe.chat_request(image_doc, mode="text").prompt_ids)
    with ServerThread(create_app(ServeSettings(model=str(tmp_path / "old")))) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60.0)
        with pytest.raises(openai.BadRequestError, match="no video tokens") as e:
            c.chat.completions.create(model=c.models.list().data[0].id, messages=message, max_tokens=3)
        assert e.value.body["param"] == "messages[0].content[0].image_url"


def test_an_animated_data_uri_is_bounded_by_its_pixels_in_all() -> None:
    import base64

    from tokenloom.serve.errors import APIError
    from tokenloom.serve.protocol import VIDEO_PIXELS, decode_data_uri
    from tokenloom.video_io import animation_bytes

    def uri(frames):
        return "data:image/gif;base64," + base64.b64encode(animation_bytes(list(_video(frames)))).decode("ascii")

    side = SIDE * SIDE  # each frame is at the pixel bound given below
    assert len(decode_data_uri(uri(VIDEO_PIXELS), "p", 1 << 20, side)) == VIDEO_PIXELS
    with pytest.raises(APIError, match="pixels in all") as e:
        decode_data_uri(uri(VIDEO_PIXELS + 1), "p", 1 << 20, side)
    assert e.value.body()["error"]["code"] == "image_too_large"


def test_the_demo_shows_a_video_for_a_model_that_has_video(model_dir, tmp_path) -> None:
    assert main(["demo", "--model", str(model_dir), "--out", str(tmp_path), "--max-new-tokens", "20"]) == 0
    page = (tmp_path / "index.html").read_text()
    assert 'src="video_000.gif"' in page and 'src="video_001.gif"' in page  # drawn, and described
    assert len(read_video(tmp_path / "video_000.gif")) == 6
