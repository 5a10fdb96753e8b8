"""Subtitles of YouTube videos, playlists and channels (or any site yt-dlp supports), fetched with yt-dlp.

For each new video this writes `<id>.<lang>.vtt` (subtitles only, never the media) and a slim `<id>.info.json`
(title, channel, upload date, duration, and which captions were taken: manual or automatic), and appends the
video to yt-dlp's download archive. A video enters the archive only once a subtitle file is on disk, so a
re-run fetches only new videos, and one whose captions were missing or failed is tried again next time.

Per language, manual subtitles are taken when present and automatic captions otherwise (`prefer_manual`);
`prefer_manual: false` ranks automatic captions first. A video that fails (unavailable, no subtitles in the
requested languages) is a counted skip; when no URL could be read at all, that is one error.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import yt_dlp
from yt_dlp.postprocessor import PostProcessor

from persona_lm.errors import PersonaError, Skips
from persona_lm.io import write_json

ARCHIVE = "archive.txt"
INFO_FIELDS = ("id", "title", "channel", "channel_id", "uploader", "upload_date", "duration", "webpage_url")

log = logging.getLogger(__name__)


@dataclass
class FetchResult:
    fetched: list[str] = field(default_factory=list)  # ids whose subtitles were written in this run
    skips: Skips = field(default_factory=lambda: Skips("video"))


def _reason(message: str) -> str:
    """`ERROR: [youtube] abc123: Video unavailable (caused by ...)` -> `Video unavailable`, so reasons aggregate."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", message).removeprefix("ERROR: ")
    message = re.sub(r"^\[[\w:.-]+\] (?:[\w.-]+: )?", "", message)
    return message.split(" (caused by")[0].splitlines()[0].strip()


class _Logger:
    """yt-dlp's output goes to our log; each error it reports is kept to become a skip reason."""

    def __init__(self):
        self.errors: list[str] = []

    def debug(self, message: str) -> None:
        log.debug(message)

    info = debug

    def warning(self, message: str) -> None:
        log.warning(message)

    def error(self, message: str) -> None:
        self.errors.append(_reason(message))


class Downloader(yt_dlp.YoutubeDL):
    """yt-dlp ranks a language's manual subtitles above its automatic captions when both are requested;
    with `prefer_manual=False` the two are handed over swapped, so automatic captions win instead."""

    def __init__(self, params: dict, prefer_manual: bool = True):
        super().__init__(params)
        self.prefer_manual = prefer_manual

    def process_subtitles(self, video_id, normal_subtitles, automatic_captions):
        if not self.prefer_manual:
            normal_subtitles, automatic_captions = automatic_captions, normal_subtitles
        return super().process_subtitles(video_id, normal_subtitles, automatic_captions)


def caption_kind(info: dict, lang: str, prefer_manual: bool) -> str:
    manual = lang in (info.get("subtitles") or {})
    automatic = lang in (info.get("automatic_captions") or {})
    return "manual" if manual and (prefer_manual or not automatic) else "automatic"


class _Record(PostProcessor):
    """Runs after each video: writes the slim info JSON and archives the video, or counts why it has no VTT."""

    def __init__(self, out_dir: Path, prefer_manual: bool, result: FetchResult):
        super().__init__()
        self.out_dir, self.prefer_manual, self.result = out_dir, prefer_manual, result

    def run(self, info):
        vid = info["id"]
        requested = info.get("requested_subtitles") or {}
        written = {lang: Path(s["filepath"]) for lang, s in requested.items()
                   if s.get("filepath") and Path(s["filepath"]).is_file()}
        if not requested:
            langs = ", ".join(self._downloader.params["subtitleslangs"])
            self.result.skips.add(f"no subtitles in the requested languages ({langs})", vid)
            return [], info
        if not written:
            self.result.skips.add("subtitle download failed", vid)
            return [], info
        slim = {k: info.get(k) for k in INFO_FIELDS}
        slim["extractor"] = info.get("extractor_key")
        slim["subtitles"] = {lang: {"file": p.name, "kind": caption_kind(info, lang, self.prefer_manual)}
                             for lang, p in sorted(written.items())}
        write_json(self.out_dir / f"{vid}.info.json", slim)
        self._downloader.record_download_archive(info)
        self.result.fetched.append(vid)
        return [], info


def ydl_options(out_dir: Path, languages: list[str], max_videos: int | None, logger: _Logger) -> dict:
    return {
        "skip_download": True,  # subtitles only, never the media
        "writesubtitles": True,
        "writeautomaticsub": True,
        "subtitleslangs": list(languages),
        "subtitlesformat": "vtt",
        "outtmpl": {"default": "%(id)s.%(ext)s"},  # -> <id>.<lang>.vtt: ids are safe file names, titles are not
        "paths": {"home": str(out_dir)},
        "download_archive": str(out_dir / ARCHIVE),
        "max_downloads": max_videos,
        "ignoreerrors": True,  # one bad video must not end a channel; errors reach the logger and become skips
        "ignore_no_formats_error": True,  # no playable format is fine: only the subtitles are wanted
        "logger": logger,
        "quiet": True,
        "noprogress": True,
    }


def fetch_transcripts(urls: list[str], out_dir: Path, languages: list[str], prefer_manual: bool = True,
                      max_videos: int | None = None) -> FetchResult:
    """Fetch subtitles of new videos into `out_dir`; with no URLs, return before yt-dlp opens anything."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ARCHIVE).touch()  # the archive always exists, so the folder is never an empty DVC output
    result = FetchResult()
    if not urls:
        return result
    logger = _Logger()
    failed: list[tuple[str, str]] = []
    with Downloader(ydl_options(out_dir, languages, max_videos, logger), prefer_manual) as ydl:
        ydl.add_post_processor(_Record(out_dir, prefer_manual, result), when="after_video")
        for url in urls:
            seen = len(logger.errors)
            try:
                info = ydl.extract_info(url, download=True)
            except yt_dlp.utils.MaxDownloadsReached:
                log.info("max_videos (%d) reached", max_videos)
                break
            except yt_dlp.utils.DownloadError as e:
                logger.errors.append(_reason(str(e)))
                info = None
            for reason in logger.errors[seen:]:
                result.skips.add(reason, url)
            if info is None:
                failed.append((url, (logger.errors[seen:] or ["nothing could be extracted"])[-1]))
    if failed and len(failed) == len(urls) and not result.fetched:
        url, reason = failed[0]
        raise PersonaError(f"youtube.urls: none of the {len(urls)} URL(s) could be read ({url}: {reason}) — "
                           "check the network connection and the URLs")
    return result
