"""Stage fetch_transcripts: subtitles of `youtube.urls` (videos, playlists, channels) into data/raw/youtube as
`<id>.<lang>.vtt` + `<id>.info.json`, with yt-dlp's archive so re-runs fetch only new videos.

With no URLs the stage only makes sure the folder exists and opens no connection. The folder is a persistent
DVC output: earlier downloads stay, and process_transcripts reads whatever is there.
"""

from pathlib import Path

from persona_lm import stage
from persona_lm.data.youtube import fetch_transcripts
from persona_lm.errors import log
from persona_lm.params import Params

OUT = Path("data/raw/youtube")


def main(p: Params) -> None:
    y = p.youtube
    result = fetch_transcripts(y.urls, OUT, y.languages, prefer_manual=y.prefer_manual, max_videos=y.max_videos)
    if not y.urls:
        log.info("fetch_transcripts: youtube.urls is empty, nothing to fetch")
        return
    log.info("fetch_transcripts: %d new video(s) -> %s; skipped %d %s", len(result.fetched), OUT,
             result.skips.total, result.skips.as_dict() or "")


if __name__ == "__main__":
    stage.run(main)
