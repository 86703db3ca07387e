"""The web pages shipped in the package (``gateway/web``): ``/compare``, ``/arena``, ``/leaderboard``.

Plain HTML, CSS and JavaScript (jsdiff, vendored, for the word diff): no build step, nothing from a CDN. The pages
call the public API only; with ``--api-key`` they ask for the key and keep it in the browser's local storage.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB = Path(__file__).resolve().parents[1] / "web"

router = APIRouter(include_in_schema=False)


def static_files() -> StaticFiles:
    """The pages' scripts and styles, mounted at ``/web``."""
    return StaticFiles(directory=WEB)


@router.get("/compare")
async def compare_page() -> FileResponse:
    return FileResponse(WEB / "compare.html")


@router.get("/arena")
async def arena_page() -> FileResponse:
    return FileResponse(WEB / "arena.html")


@router.get("/leaderboard")
async def leaderboard_page() -> FileResponse:
    return FileResponse(WEB / "leaderboard.html")
