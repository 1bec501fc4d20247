"""Images in turns: what a dataset may give, how it is checked, and what reaches the server."""

from __future__ import annotations

import base64
import json
import os

import pandas as pd
import pytest

import nbllm
from nbllm import ChatRequest, FakeEngine
from nbllm.dataset import load_conversations
from nbllm.errors import ConfigError, DatasetError
from nbllm.executor.cache import request_key
from nbllm.images import (
    IMAGE_TOKENS,
    check_engine_takes_images,
    content_chars,
    content_text,
    detect_mime,
)
from nbllm.template import ConversationTemplate
from nbllm.testing import TestServer
from nbllm.testing.request_log import messages_key

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(40))
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(40))
GIF = b"GIF89a" + bytes(range(40))
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(range(40))


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
def pictures(tmp_path, monkeypatch):
    """A folder with a PNG, a JPEG and a text file, as the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chart.png").write_bytes(PNG)
    (tmp_path / "photo.jpg").write_bytes(JPEG)
    (tmp_path / "notes.txt").write_text("not a picture")
    return tmp_path


# --------------------------------------------------------------------------- MIME types


@pytest.mark.parametrize(
    ("data", "mime"),
    [
        (PNG, "image/png"),
        (JPEG, "image/jpeg"),
        (GIF, "image/gif"),
        (b"GIF87a" + bytes(8), "image/gif"),
        (WEBP, "image/webp"),
        (b"BM" + bytes(30), "image/bmp"),
        (b"II*\x00" + bytes(8), "image/tiff"),
    ],
)
def test_the_mime_type_comes_from_the_first_bytes_whatever_the_name(data, mime):
    assert detect_mime(data) == mime
    assert detect_mime(data, "misnamed.txt") == mime


def test_a_name_decides_only_for_formats_without_a_magic_number_here():
    svg = b"<svg xmlns='http://www.w3.org/2000/svg'/>"
    assert detect_mime(svg, "logo.svg") == "image/svg+xml"
    assert detect_mime(svg) is None
    # A .png whose bytes are no PNG is not an image, nor is a RIFF that is not WebP.
    assert detect_mime(b"hello", "fake.png") is None
    assert detect_mime(b"RIFF\x24\x00\x00\x00WAVEfmt ", "sound.webp") is None
    assert detect_mime(b"", "empty.svg") is None


# --------------------------------------------------------------------------- what a dataset gives


def test_a_file_becomes_a_data_url_of_its_bytes_read_once_for_every_conversation(pictures):
    convs = load_conversations(
        [
            {"id": "a", "turns": ["What is this?", "And the colour?"], "images": ["chart.png"]},
            {"id": "b", "turns": ["Compare"], "images": [[pictures / "chart.png", "photo.jpg"]]},
        ]
    )
    a, b = convs
    assert a.images == ((data_url("image/png", PNG),), ())
    assert b.images == ((data_url("image/png", PNG), data_url("image/jpeg", JPEG)),)
    # One string in memory for a picture that many conversations share.
    assert a.images[0][0] is b.images[0][0]


def test_urls_pass_unchanged_and_bytes_are_encoded():
    given = "data:image/gif;base64," + base64.b64encode(GIF).decode()
    (conv,) = load_conversations(
        [
            {
                "id": "a",
                "turns": ["one", "two", "three"],
                "images": [["https://example.com/x.png?s=1"], None, [WEBP, given]],
            }
        ]
    )
    assert conv.images == (
        ("https://example.com/x.png?s=1",),
        (),
        (data_url("image/webp", WEBP), given),
    )


def test_a_turn_with_images_is_sent_as_content_parts_and_one_without_as_text(pictures):
    (conv,) = load_conversations(
        [{"id": "a", "turns": ["Describe it", "Thanks"], "images": "chart.png"}]
    )
    messages = conv.messages_for(1, ["A blue chart"], "Be brief")
    assert messages == [
        {"role": "system", "content": "Be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe it"},
                {"type": "image_url", "image_url": {"url": data_url("image/png", PNG)}},
            ],
        },
        {"role": "assistant", "content": "A blue chart"},
        {"role": "user", "content": "Thanks"},
    ]
    assert content_text(messages[1]["content"]) == "Describe it"


def test_dataframes_carry_images_in_an_image_column(pictures):
    long = pd.DataFrame(
        {
            "conversation_id": ["a", "a", "b"],
            "turn": [1, 0, 0],
            "question": ["second", "first", "only"],
            "image": [None, "chart.png", ["photo.jpg", "https://example.com/y.png"]],
        }
    )
    a, b = load_conversations(long)
    assert a.images == ((data_url("image/png", PNG),), ())
    assert b.images == ((data_url("image/jpeg", JPEG), "https://example.com/y.png"),)

    wide = pd.DataFrame(
        {"id": ["w"], "question_0": ["q0"], "question_1": ["q1"], "image_1": ["chart.png"]}
    )
    (w,) = load_conversations(wide)
    assert w.images == ((), (data_url("image/png", PNG),))


def test_a_templates_image_lines_send_the_cell_or_a_filled_in_path(pictures):
    template = ConversationTemplate.parse(
        "user: What is {name}?\nimage: {picture}\nimage: {folder}/photo.jpg\nuser: Why?\n"
    )
    assert template is not None
    frame = pd.DataFrame(
        {"name": ["x", "y"], "picture": [PNG, None], "folder": [str(pictures), str(pictures)]}
    )
    first, second = load_conversations(template.records(frame))
    assert first.images == ((data_url("image/png", PNG), data_url("image/jpeg", JPEG)), ())
    assert second.images == ((data_url("image/jpeg", JPEG),), ())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("images", "expected"),
    [
        (
            [[], ["missing.png"]],
            "record 0 (id='a'), key 'images', turn 1: no such image file 'missing.png' "
            "(relative to ",
        ),
        (["notes.txt"], "record 0 (id='a'), key 'images', turn 0, image 0: 'notes.txt' is not"),
        ([[b"plain text"], []], "turn 0: the bytes given are not an image"),
        ([[], [b""]], "turn 1: the bytes given are empty, not an image"),
        ("s3://bucket/x.png", "has a URL scheme nbllm does not read (s3://)"),
        ("data:text/plain;base64,aGk=", "is not a base64 image data URL"),
        (".", "'.' is a directory, expected an image file"),
        ([["chart.png"], "chart.png"], "a mix of lists and single images"),
        ([["chart.png"]], "expected 2 entries, one list of images per turn, got 1"),
        ([[3]], "expected 2 entries"),
        ({"turn": 0}, "expected a list of images, got dict"),
        ([[], [3]], "turn 1: expected an image as a path, an http(s) URL or bytes, got int"),
    ],
)
def test_bad_images_are_refused_naming_the_conversation_and_turn(pictures, images, expected):
    with pytest.raises(DatasetError) as caught:
        load_conversations([{"id": "a", "turns": ["q0", "q1"], "images": images}])
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_missing_image_in_a_dataframe_names_its_row_and_is_refused_before_any_request(
    pictures,
):
    frame = pd.DataFrame(
        {"conversation_id": ["a"], "turn": [0], "question": ["q"], "image": ["gone.png"]}
    )
    seen = []
    with pytest.raises(DatasetError, match=r"row 0 \(conversation_id='a', turn 0\), column "):
        nbllm.run(frame, engine=FakeEngine(seen.append), model="m", progress=False)
    assert seen == []


def test_engines_that_build_a_text_prompt_refuse_images_naming_the_engine(pictures):
    with_images = load_conversations([{"id": "a", "turns": ["q"], "images": "chart.png"}])
    text_only = load_conversations([{"id": "a", "turns": ["q"]}])
    for engine in ("torch", "vllm", "onnx", "llamacpp", "deepspeed", "torch worker"):
        with pytest.raises(ConfigError, match=f"engine '{engine}' cannot send images"):
            check_engine_takes_images(engine, with_images)
        check_engine_takes_images(engine, text_only)
    with pytest.raises(ConfigError, match=r"^a local model cannot take images"):
        check_engine_takes_images("local", with_images)
    for engine in ("openai", "litellm", "auto", FakeEngine()):
        check_engine_takes_images(engine, with_images)

    class Declared:
        name = "openai"
        takes_images = False

    with pytest.raises(ConfigError, match="engine 'openai' cannot send images"):
        check_engine_takes_images(Declared(), with_images)


# --------------------------------------------------------------------------- hashing


def test_a_requests_key_follows_the_image_bytes_not_the_path(pictures):
    os.mkdir("moved")
    (pictures / "moved" / "same.png").write_bytes(PNG)
    (pictures / "other.png").write_bytes(PNG + b"\x00")

    def key(path):
        (conv,) = load_conversations([{"id": "a", "turns": ["q"], "images": path}])
        return request_key(ChatRequest("m", conv.messages_for(0, []), {}))

    assert key("chart.png") == key("moved/same.png")
    assert key("chart.png") != key("other.png")


def test_what_a_fingerprint_hashes_beyond_the_text_holds_the_image_bytes(pictures):
    (plain,) = load_conversations([{"id": "a", "turns": ["q"]}])
    assert plain.sent_extras() == []  # a text-only conversation hashes as it did before
    (chart,) = load_conversations([{"id": "a", "turns": ["q"], "images": "chart.png"}])
    (changed,) = load_conversations([{"id": "a", "turns": ["q"], "images": PNG + b"\x00"}])
    assert data_url("image/png", PNG) in json.dumps(chart.sent_extras())
    assert json.dumps(chart.sent_extras()) != json.dumps(changed.sent_extras())


def test_an_image_counts_as_a_fixed_share_of_a_token_estimate_not_its_urls_length():
    huge = data_url("image/png", PNG * 10_000)
    parts = [
        {"type": "text", "text": "abcd"},
        {"type": "image_url", "image_url": {"url": huge}},
        {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
    ]
    assert content_chars(parts) == 4 + 2 * 4 * IMAGE_TOKENS
    assert content_chars("abcd") == 4


# --------------------------------------------------------------------------- the HTTP round trip


def test_images_reach_the_server_in_the_request_body_with_exact_history(pictures):
    records = [
        {"id": "a", "turns": ["What is shown?", "Summarise"], "images": [["chart.png"], []]},
        {"id": "b", "turns": ["Compare these", "Which is newer?"], "images": [[], ["photo.jpg"]]},
    ]
    png_part = {"type": "image_url", "image_url": {"url": data_url("image/png", PNG)}}
    jpeg_part = {"type": "image_url", "image_url": {"url": data_url("image/jpeg", JPEG)}}
    with TestServer() as server:
        result = nbllm.run(
            records,
            model="openai/nbllm-test",
            api_base=server.url,
            checkpoint=False,
            progress=False,
        )
        seen = sorted(e.key for e in server.requests if e.status == 200)
        history_errors = server.history_errors
    assert result.summary.turns_ok == 4
    assert history_errors == 0
    a0, a1, b0, b1 = result.df["answer"].tolist()
    a_first = {"role": "user", "content": [{"type": "text", "text": "What is shown?"}, png_part]}
    b_second = {
        "role": "user",
        "content": [{"type": "text", "text": "Which is newer?"}, jpeg_part],
    }
    # What the server received, message for message, down to each image's bytes.
    expected = [
        [a_first],
        [a_first, {"role": "assistant", "content": a0}, {"role": "user", "content": "Summarise"}],
        [{"role": "user", "content": "Compare these"}],
        [
            {"role": "user", "content": "Compare these"},
            {"role": "assistant", "content": b0},
            b_second,
        ],
    ]
    assert seen == sorted(messages_key(m) for m in expected)
    assert a0.startswith("Answer to turn 0: What is shown?")
    assert a1.startswith("Answer to turn 1: Summarise")
    assert b1.startswith("Answer to turn 1: Which is newer?")
