"""Decoding on the encode worker: a video's time cap counts from when it was queued, and what the
decoders raise on a client's bytes is that client's 400."""

from __future__ import annotations

import time

import pytest

from serving.stages.decode import decode_image, decode_item
from serving.types import MediaItem, MediaRejected
from tests.e2e import videos


def test_a_video_that_waited_out_its_time_is_a_422():
    item = MediaItem(videos.clip(), True, (48, 64), (0, 1), "messages.0.content.0", 10**8, timeout_s=5.0)
    assert decode_item(item, time.monotonic()).shape == (2, 48, 64, 3)
    with pytest.raises(MediaRejected) as err:
        decode_item(item, time.monotonic() - 6.0)
    assert (err.value.rejection.status, err.value.rejection.code) == (422, "media_timeout")


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"GIF89a" + b"\xff" * 30, b""])
def test_undecodable_bytes_are_the_clients_400(data):
    with pytest.raises(MediaRejected) as err:
        decode_image(data, 10**8, "messages.0.content.0")
    assert (err.value.rejection.status, err.value.rejection.param) == (400, "messages.0.content.0")
