"""The gradio demo: served on a free local port and driven through its API (gradio_client, raw HTTP) and a headless
Chromium (Playwright with the system browser; no browser download).

Set INSTRUCTSEG_DEMO_SCREENSHOT=docs/demo_screenshot.png to also save the browser test's screenshot there, and
INSTRUCTSEG_DEMO_MODEL=DIR to drive the browser test with another saved model instead of the tiny one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

from instructseg.app import EXAMPLES_DIR, Visit, _frame_view, _overlay_file, _user_errors, _view_lock, _view_scale, \
    build_app  # noqa: E402
from instructseg.errors import InputError  # noqa: E402
from instructseg.cli import main  # noqa: E402
from instructseg.inference.io import open_source, write_video  # noqa: E402
from instructseg.inference.predictor import InstructSegPredictor  # noqa: E402
from instructseg.inference.results import PALETTE, SegmentationResult, encode_mask  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIDEO, IMAGE = EXAMPLES_DIR / "shapes.mp4", EXAMPLES_DIR / "shapes.png"
MAX_UPLOAD_MB, MAX_FRAMES = 1, 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingPredictor:
    """The real predictor, counting how many model calls (run) are in flight at once (the app serialises them)."""

    def __init__(self, predictor):
        self.predictor, self.running, self.most, self.calls = predictor, 0, 0, 0
        self._lock = threading.Lock()

    def run(self, *args, **kwargs):
        with self._lock:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(0.05)  # widen the window in which an overlap would show
            return self.predictor.run(*args, **kwargs)
        finally:
            with self._lock:
                self.running -= 1

    def segment(self, *args, **kwargs):
        return self.run(*args, **kwargs)[0]


@pytest.fixture(scope="module")
def predictor(seg_model_dir):
    return CountingPredictor(InstructSegPredictor(str(seg_model_dir)))


def _serve(demo):
    port = _free_port()
    demo.launch(prevent_thread_lock=True, server_port=port, quiet=True)  # host and upload limit: the app's defaults
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def server(predictor):
    demo = build_app(predictor, max_upload_mb=MAX_UPLOAD_MB, max_frames=MAX_FRAMES)
    url = _serve(demo)
    yield demo, url
    demo.close()


@pytest.fixture
def client(server):
    return Client(server[1], verbose=False)


# ---------------------------------------------------------------------------------------------- safe defaults
def test_binds_loopback_with_upload_limit_and_queue(server):
    demo, url = server
    assert demo.server_name == "127.0.0.1" and url.startswith("http://127.0.0.1:")
    assert demo.max_file_size == MAX_UPLOAD_MB * 1024 * 1024
    assert demo._queue.max_size is not None
    limits = {fn.concurrency_id: fn.concurrency_limit for fn in demo.fns.values() if fn.api_name}
    assert limits["model"] == 1


def test_bundled_examples_are_small_and_listed():
    index = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    assert set(index) == {"shapes.mp4", "shapes.png"}
    assert sum((EXAMPLES_DIR / name).stat().st_size for name in index) < 1024 * 1024
    with open_source(VIDEO) as source:
        assert len(source) == 16 and source.is_video
    assert all(entry["instructions"] for entry in index.values())


def test_cli_rejects_bad_limits_before_loading_a_model(capsys):
    assert main(["demo", "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb" in capsys.readouterr().err
    assert main(["demo", "--max-frames", "0"]) == 2
    assert main(["demo", "--port", "70000"]) == 2


# ---------------------------------------------------------------------------------------------- API
def test_api_multi_round_chat_toggles_points_and_download(client, server):
    loaded = client.predict(handle_file(str(VIDEO)), api_name="/load")
    assert "16 frames" in loaded[1]
    # gradio's cache cleaner deletes uploads after an hour; the visit reads its own copy
    for upload in Path(gr.utils.get_upload_folder()).rglob(VIDEO.name):
        upload.unlink()
    first = client.predict("the black shape", api_name="/ask")
    chat, video, zip_path = first[1], first[2], first[6]
    assert [m["role"] for m in chat] == ["user", "assistant"] and "1 object segmented" in str(chat[1]["content"])
    assert Path(video).suffix == ".mp4" and Path(video).stat().st_size > 0
    with open_source(video) as overlay_video:
        assert len(overlay_video) == 16 and (overlay_video.height, overlay_video.width) == (144, 192)
    with zipfile.ZipFile(zip_path) as z:
        names = set(z.namelist())
        result = json.loads(z.read("result.json"))
    assert result["instruction"] == "the black shape" and len(result["objects"]) == 1
    assert names == {"result.json"} | {f"masks/1/{name}.png" for name in result["frames"]}

    second = client.predict("the square", api_name="/ask")  # a second round keeps the history
    assert [m["role"] for m in second[1]] == ["user", "assistant"] * 2

    hidden = client.predict([], 3, api_name="/show_objects")
    assert Path(hidden[0]).name.startswith("overlay_none") and hidden[2]
    assert client.predict(5, [1], api_name="/show_frame")

    with pytest.raises(Exception, match="outside"):
        client.predict(3, 1, "positive", 500, 40, [1], api_name="/add_point")
    status = client.predict(3, 1, "negative", 50, 40, [1], api_name="/add_point")[1]
    assert "negative point at (50, 40) for object 1 on frame 3" in status
    refined = client.predict([1], 3, api_name="/propagate")
    assert "Refined with 1 point" in str(refined[0][-1]["content"])
    assert Path(refined[5]).name == "shapes_turn3_masks.zip"


def test_api_image_example_and_stateless_segment(client):
    loaded = client.predict("shapes.png", api_name="/load_example")
    assert "image" in loaded[1]
    answer = client.predict("the circle at the bottom", api_name="/ask")
    assert answer[2] is None and Path(answer[3]).suffix == ".png"

    text, overlay_path, zip_path = client.predict(handle_file(str(IMAGE)), "the circle", api_name="/segment")
    assert isinstance(text, str) and Image.open(overlay_path).size == (192, 144)
    assert "result.json" in zipfile.ZipFile(zip_path).namelist()


def test_eight_concurrent_requests_all_succeed_one_model_call_at_a_time(server, predictor):
    url = server[1]
    before = predictor.calls

    def one(i):
        c = Client(url, verbose=False)
        media = VIDEO if i % 2 else IMAGE
        return c.predict(handle_file(str(media)), f"the shape number {i}", api_name="/segment")

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    elapsed = time.perf_counter() - start
    assert len(results) == 8 and all(Path(r[1]).stat().st_size > 0 and Path(r[2]).exists() for r in results)
    assert predictor.calls - before == 8
    assert predictor.most == 1, "model calls overlapped"
    print(f"8 concurrent /segment requests: {elapsed:.1f} s")


# ---------------------------------------------------------------------------------------------- refusals
def test_oversized_upload_is_refused_with_a_message(server, client, tmp_path):
    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(int(1.5 * MAX_UPLOAD_MB * 1024 * 1024)))
    with pytest.raises(Exception, match="maximum file size"):  # the client checks the app's limit first
        client.predict(handle_file(str(big)), api_name="/load")
    import httpx

    with open(big, "rb") as f:  # and the upload route refuses it without the client's help
        response = httpx.post(server[1] + "gradio_api/upload", files={"files": ("big.mp4", f, "video/mp4")})
    assert response.status_code == 413 and "maximum allowed size" in response.text


def test_upload_limit_is_also_checked_by_the_handlers(predictor, tmp_path):
    demo = build_app(predictor, max_upload_mb=0.01, max_frames=MAX_FRAMES)
    port = _free_port()
    demo.launch(prevent_thread_lock=True, server_port=port, quiet=True, max_file_size=None)  # no route limit
    url = f"http://127.0.0.1:{port}/"
    try:
        with pytest.raises(Exception, match=r"is 0\.\d MB; this demo accepts uploads up to 0.01 MB"):
            Client(url, verbose=False).predict(handle_file(str(IMAGE)), api_name="/load")
    finally:
        demo.close()


def test_too_many_frames_is_refused_with_a_message(client, tmp_path):
    long_video = write_video(tmp_path / "long.mp4", (np.full((32, 32, 3), 8 * t, np.uint8) for t in range(24)))
    with pytest.raises(Exception, match=f"has more than {MAX_FRAMES} frames; this demo accepts at most {MAX_FRAMES}"):
        client.predict(handle_file(str(long_video)), api_name="/load")


def test_no_parameter_reads_server_files(server, client):
    import httpx

    url = server[1]
    with pytest.raises(Exception, match="not in the list of choices"):
        client.predict("../app.py", api_name="/load_example")
    secret = {"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}
    for endpoint, data in (("segment", [secret, "x"]), ("load", [secret])):
        event = httpx.post(f"{url}gradio_api/call/{endpoint}", json={"data": data}).json()["event_id"]
        stream = httpx.get(f"{url}gradio_api/call/{endpoint}/{event}", timeout=60).text
        assert "event: error" in stream and "complete" not in stream
    for path in ("/etc/hostname", str(IMAGE), str(EXAMPLES_DIR / "examples.json")):
        assert httpx.get(f"{url}gradio_api/file={path}").status_code in (403, 404)


def test_errors_are_messages(client):
    with pytest.raises(Exception, match="upload a video or an image"):
        Client(client.src, verbose=False).predict("hello", api_name="/ask")
    client.predict("shapes.png", api_name="/load_example")
    with pytest.raises(Exception, match="type an instruction"):
        client.predict("   ", api_name="/ask")
    with pytest.raises(Exception, match="ask for an object first"):
        client.predict(0, None, "positive", 5, 5, [], api_name="/add_point")


# ---------------------------------------------------------------------------------------------- drawing
def test_overlay_colours_follow_object_ids_and_toggles(predictor, tmp_path):
    """Two known masklets (the tiny model's masks are empty): each object keeps its colour when the other is hidden."""
    source = open_source(VIDEO)
    visit = Visit(tmp_path, predictor, source, "shapes.mp4")
    h, w, n = source.height, source.width, len(source)
    left, right = np.zeros((h, w), bool), np.zeros((h, w), bool)
    left[10:40, 10:40], right[60:100, 120:170] = True, True
    visit.session.last = SegmentationResult("x", "", "propagate", list(source.names), h, w, timing={}, objects=[])
    from instructseg.inference.results import Masklet

    visit.session.last.objects = [Masklet(1, 0.9, [encode_mask(left)] * n), Masklet(2, 0.8, [encode_mask(right)] * n)]
    visit.out = tmp_path / "turn"
    visit.out.mkdir()
    try:
        only_two = _overlay_file(visit, [2])[0]
        with open_source(only_two) as rendered:
            frame = rendered.frame(5).astype(int)
        plain = source.frame(5).astype(int)
        assert np.abs(frame[20, 20] - plain[20, 20]).max() < 12  # object 1 hidden
        expected = (plain[80, 145] + np.array(PALETTE[1])) / 2  # object 2 in the second colour
        assert np.abs(frame[80, 145] - expected).max() < 16
        visit.clicks[(5, 1)] = [(25.0, 25.0, 1)]
        view, k = _frame_view(visit, 5, [1, 2]), _view_scale(source)
        assert k == 2 and view.shape == (h * k, w * k, 3)  # small frames are enlarged for clicking
        assert tuple(view[25 * k, 25 * k]) == (0, 200, 0)  # the click, drawn in green
        assert np.abs(view[80 * k, 145 * k].astype(int) - expected).max() < 4
    finally:
        visit.close()


# ---------------------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def browser_server(predictor):
    model = os.environ.get("INSTRUCTSEG_DEMO_MODEL")
    demo = build_app(InstructSegPredictor(model) if model else predictor)  # the default limits
    url = _serve(demo)
    yield url
    demo.close()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs the system chromium at /usr/bin/chromium "
                                                   "(apt-get install -y chromium)")
def test_browser_upload_ask_overlay_click_propagate(browser_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    instruction = json.loads((EXAMPLES_DIR / "examples.json").read_text())["shapes.mp4"]["instructions"][0]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(browser_server)
            # a question that fails (nothing loaded yet) gives the message back to its box
            page.locator("#message textarea").fill(instruction)
            page.locator("#send").click()
            page.get_by_text("(or load an example) first").first.wait_for(timeout=30_000)
            page.wait_for_function(f"() => document.querySelector('#message textarea').value === {instruction!r}",
                                   timeout=30_000)
            page.locator("#media input[type=file]").set_input_files(str(VIDEO))
            page.locator("#status").get_by_text("16 frames").wait_for(timeout=60_000)
            page.locator("#send").click()
            # the box empties as the message is sent, before the answer arrives
            cleared = page.wait_for_function(
                "() => document.querySelector('#message textarea').value === ''"
                " && {answered: document.querySelector('#chat').innerText.includes('segmented')}",
                polling=10, timeout=30_000).json_value()
            assert cleared == {"answered": False}
            page.locator("#chat").get_by_text("segmented").wait_for(timeout=120_000)
            assert page.locator("#chat").get_by_text(instruction).count() == 1
            # a non-empty overlay: the video decodes at the source size and has a duration
            size = page.wait_for_function(
                "() => { const v = document.querySelector('#overlay-video video');"
                " return v && v.readyState >= 2 && v.duration > 0 && [v.videoWidth, v.videoHeight]; }",
                timeout=60_000).json_value()
            assert size == [192, 144]
            page.locator('#download [aria-label="shapes_turn1_masks.zip"]').wait_for(timeout=30_000)
            # a click in the middle of the frame adds a point at the middle of the source frame
            img = page.locator("#frame-image img")
            img.wait_for()
            box = img.bounding_box()
            img.click(position={"x": box["width"] / 2, "y": box["height"] / 2})
            added = page.locator("#status").get_by_text("Added a positive point at")
            added.wait_for(timeout=30_000)
            x, y, obj, t = map(int, re.search(r"at \((\d+), (\d+)\) for object (\d+) on frame (\d+)",
                                              added.inner_text()).groups())
            assert abs(x - 96) <= 2 and abs(y - 72) <= 2 and (obj, t) == (1, 0)
            page.locator("#propagate").click()
            page.locator("#chat").get_by_text("Refined with 1 point").wait_for(timeout=120_000)
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[0] > 600 and pixels.shape[1] == 1400 and pixels.std() > 10
    if os.environ.get("INSTRUCTSEG_DEMO_SCREENSHOT"):
        shutil.copy(shot, os.environ["INSTRUCTSEG_DEMO_SCREENSHOT"])


def test_views_of_large_frames_are_reduced(predictor, tmp_path):
    """WebP (how gradio sends images) stops at 16383 px: a frame over MAX_VIEW_SIDE is shown reduced, and a click
    on the reduced view still lands on the right source pixel."""
    from instructseg.demo_views import MAX_VIEW_SIDE

    wide = tmp_path / "panorama.png"
    Image.fromarray(np.full((300, 9000, 3), 90, np.uint8)).save(wide)
    visit = Visit(tmp_path, predictor, open_source(wide), wide.name)
    try:
        k = _view_scale(visit.source)
        view = _frame_view(visit, 0, [])
        assert k < 1 and view.shape[1] == MAX_VIEW_SIDE and view.shape[0] == round(300 * k)
    finally:
        visit.close()


def test_views_do_not_wait_behind_a_question_and_bugs_are_messages(predictor, tmp_path):
    visit = Visit(tmp_path, predictor, open_source(IMAGE), IMAGE.name)
    asking, done = threading.Event(), threading.Event()

    def question():  # holds the visit's lock as a running question does
        with visit.lock:
            asking.set()
            done.wait(10)

    thread = threading.Thread(target=question)
    thread.start()
    try:
        asking.wait(10)
        with pytest.raises(InputError, match="the answer is on its way"):
            with _view_lock(visit):
                pass
    finally:
        done.set()
        thread.join()
    with _view_lock(visit):  # free again once the question is done
        assert visit.lock.acquire(blocking=False)  # and re-entrant for the view's own helpers
        visit.lock.release()
    visit.close()

    @_user_errors
    def broken():
        raise ValueError("boom")

    with pytest.raises(gr.Error, match=r"something went wrong \(ValueError: boom\)"):
        broken()
