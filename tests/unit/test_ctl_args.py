"""`epd ctl`'s connection options are accepted before the verb or after it."""

from __future__ import annotations

import pytest

from serving.cli import build_parser


@pytest.mark.parametrize(
    ("argv", "url", "key"),
    [
        (["ctl", "workers", "--json", "--url", "http://x:1"], "http://x:1", None),
        (["ctl", "--url", "http://y:2", "workers"], "http://y:2", None),
        (["ctl", "--url", "http://a:3", "drain", "w", "--api-key", "k"], "http://a:3", "k"),
        (["ctl", "--url", "http://a:3", "decisions", "--url", "http://b:4"], "http://b:4", None),
    ],
)
def test_connection_options_anywhere(argv, url, key, monkeypatch):
    monkeypatch.delenv("EPD_API_KEY", raising=False)
    args = build_parser().parse_args(argv)
    assert (args.url, args.api_key, args.timeout) == (url, key, 300.0)
