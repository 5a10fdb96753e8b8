"""fetch_transcripts: yt-dlp's real extractors against HTML5 `<video>`/`<track>` pages served on 127.0.0.1."""

from __future__ import annotations

import http.server
import json
import runpy
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from persona_lm.data.youtube import Downloader, caption_kind, fetch_transcripts
from persona_lm.errors import PersonaError
from persona_lm.params import parse_params

STAGE = Path(__file__).resolve().parents[1] / "stages" / "fetch_transcripts.py"
VTT_EN = b"WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there, friend.\n"


def page(title: str, tracks: dict[str, str]) -> bytes:
    """An HTML5 video page; yt-dlp's generic extractor reads its `<track kind="subtitles">` elements."""
    track_tags = "".join(f'<track kind="subtitles" srclang="{lang}" src="{src}">' for lang, src in tracks.items())
    return (f'<html><head><title>{title}</title></head><body><video controls>'
            f'<source src="clip.mp4" type="video/mp4">{track_tags}</video></body></html>').encode()


SITE = {
    "/talks/talk.html": page("Talk", {"en": "talk.en.vtt", "de": "talk.de.vtt"}),
    "/talks/talk.en.vtt": VTT_EN,
    "/talks/talk.de.vtt": b"WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nHallo.\n",
    "/talks/french.html": page("French", {"fr": "french.fr.vtt"}),
    "/talks/french.fr.vtt": b"WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nBonjour.\n",
    "/talks/second.html": page("Second", {"en": "second.en.vtt"}),
    "/talks/second.en.vtt": VTT_EN,
    "/talks/broken.html": page("Broken", {"en": "nowhere.en.vtt"}),
}


@contextmanager
def site(routes: dict[str, bytes]):
    """Serves `routes` on a free 127.0.0.1 port; yields (base url, paths requested)."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            if self.path not in routes:
                self.send_error(404)
                return
            body = routes[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "text/vtt" if self.path.endswith(".vtt") else "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Last-Modified", "Tue, 02 Jan 2024 10:00:00 GMT")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/talks", seen
    finally:
        server.shutdown()
        server.server_close()


def test_fetches_subtitles_with_id_only_names_and_archive(tmp_path):
    out = tmp_path / "youtube"
    with site(SITE) as (base, seen):
        first = fetch_transcripts([f"{base}/talk.html"], out, ["en"])
        first_requests = list(seen)
        seen.clear()
        second = fetch_transcripts([f"{base}/talk.html"], out, ["en"])

    # The generic extractor names an HTML5 page's video `<page name>-<n>`.
    assert first.fetched == ["talk-1"] and first.skips.total == 0
    assert sorted(p.name for p in out.iterdir()) == ["archive.txt", "talk-1.en.vtt", "talk-1.info.json"]
    assert (out / "talk-1.en.vtt").read_bytes() == VTT_EN
    assert first_requests == ["/talks/talk.html", "/talks/talk.en.vtt"]  # no German track, no media
    info = json.loads((out / "talk-1.info.json").read_text())
    assert info["id"] == "talk-1" and info["title"] == "Talk (1)" and info["upload_date"] == "20240102"
    assert {"channel", "duration", "webpage_url"} <= info.keys()
    assert info["subtitles"] == {"en": {"file": "talk-1.en.vtt", "kind": "manual"}}
    assert (out / "archive.txt").read_text().split() == ["html5mediaembed", "talk-1"]
    # Re-run: the archive stops it before any subtitle is fetched; only the page is read to learn the id.
    assert second.fetched == [] and seen == ["/talks/talk.html"]


def test_failed_videos_are_counted_skips_and_not_archived(tmp_path):
    out = tmp_path / "youtube"
    with site(SITE) as (base, seen):
        result = fetch_transcripts([f"{base}/french.html", f"{base}/missing.html", f"{base}/broken.html",
                                    f"{base}/second.html"], out, ["en"])
    assert result.fetched == ["second-1"]
    assert result.skips.as_dict() == {
        "Unable to download webpage: HTTP Error 404: Not Found": 1,
        "no subtitles in the requested languages (en)": 1,
        "subtitle download failed": 1,
    }
    assert (out / "archive.txt").read_text().split() == ["html5mediaembed", "second-1"]
    assert "/talks/french.fr.vtt" not in seen
    assert sorted(p.name for p in out.iterdir()) == ["archive.txt", "second-1.en.vtt", "second-1.info.json"]


def test_max_videos_stops_the_run(tmp_path):
    with site(SITE) as (base, seen):
        result = fetch_transcripts([f"{base}/talk.html", f"{base}/second.html"], tmp_path, ["en"], max_videos=1)
    assert result.fetched == ["talk-1"]
    assert "/talks/second.html" not in seen


def test_nothing_reachable_is_one_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PersonaError, match=r"^youtube.urls: none of the 1 URL\(s\) could be read \(http://127"):
        fetch_transcripts([f"http://127.0.0.1:{port}/v.html"], tmp_path, ["en"])


def test_stage_without_urls_opens_no_connection(tmp_path, monkeypatch):
    def refuse(self, address):
        raise AssertionError(f"network connection attempted to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.chdir(tmp_path)
    main = runpy.run_path(str(STAGE))["main"]
    main(parse_params({"youtube": {"urls": []}}))
    assert (tmp_path / "data/raw/youtube").is_dir()
    assert [f.name for f in (tmp_path / "data/raw/youtube").iterdir()] == ["archive.txt"]
    assert (tmp_path / "data/raw/youtube/archive.txt").read_text() == ""


@pytest.mark.parametrize("prefer_manual, manual, automatic, expected", [
    (True, {"en": "m"}, {"en": "a"}, {"en": "m"}),
    (False, {"en": "m"}, {"en": "a"}, {"en": "a"}),
    (False, {"en": "m"}, {"de": "a"}, {"en": "m"}),  # no automatic English: fall back to manual
    (True, {}, {"en": "a", "de": "a"}, {"en": "a"}),
])
def test_caption_preference(prefer_manual, manual, automatic, expected):
    def subs(d):
        return {lang: [{"ext": "vtt", "url": f"{url}.vtt"}] for lang, url in d.items()}

    params = {"writesubtitles": True, "writeautomaticsub": True, "subtitleslangs": ["en"],
              "subtitlesformat": "vtt", "quiet": True}
    with Downloader(params, prefer_manual) as ydl:
        chosen = ydl.process_subtitles("vid", subs(manual), subs(automatic))
    assert {lang: s["url"] for lang, s in chosen.items()} == {k: f"{v}.vtt" for k, v in expected.items()}
    kind = caption_kind({"subtitles": subs(manual), "automatic_captions": subs(automatic)}, "en", prefer_manual)
    assert kind == ("manual" if expected["en"] == "m" else "automatic")
