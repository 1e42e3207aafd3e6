"""`instructseg demo`: a gradio app to chat with a video or an image and get the answer text plus masks.

Upload a video or an image (or pick a bundled example), ask in several rounds, see the answer and an overlay with
each object in its own colour (a toggle per object), click on any frame to add positive/negative points for one
object and propagate again, and download the masks (zip of PNGs + result.json).

Safety decisions (tested in tests/test_app.py):
- binds 127.0.0.1 unless `--host` says otherwise;
- uploads above `max_upload_mb` are refused by the upload route (gradio's `max_file_size`, set by the app's `launch()`)
  and again by the handlers, with a message; videos with more than `max_frames` frames are refused with a message;
- the model runs one request at a time (the predictor keeps per-call state); other requests wait in a bounded queue;
- no input is a server path: media come from gradio's upload folder (checked again here) or by name from the
  examples index; outputs are written to a private temporary directory.

API endpoints (gradio_client; the per-visitor state follows the client's session): /load(media), /load_example(name),
/ask(message), /show_objects(objects, frame), /show_frame(frame, objects), /add_point(frame, object, polarity, x, y,
objects), /propagate(objects, frame), and the stateless /segment(media, instruction) -> (text, overlay, zip).
"""
import collections
import contextlib
import html
import json
import shutil
import tempfile
import threading
import traceback
import weakref
from pathlib import Path


from instructseg.errors import FrameLimitError, InputError
from instructseg.inference.io import IMAGE_EXTS, VIDEO_EXTS, open_source
from instructseg.demo_views import (Visit, _answer_text, _close_visit, _frame_view, _legend, _overlay_file, _timing,
                                       _view_scale, _zip, _zip_dir, private_copy)

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MEDIA_EXTS = VIDEO_EXTS + IMAGE_EXTS
QUEUE_SIZE = 64  # waiting requests beyond this are told the queue is full
VIEW_CONCURRENCY = 4  # overlay re-renders and frame views (no model) at once
LOAD_CONCURRENCY = 2  # uploads being decoded at once
MAX_MESSAGE_CHARS = 2000


# ---------------------------------------------------------------------------------------------- the app
def _demo_blocks_class():
    """gradio is imported here, not at module level, so `instructseg --help` stays fast."""
    import gradio as gr

    class _DemoBlocks(gr.Blocks):
        """gr.Blocks whose launch() applies the demo's safe defaults (upload limit, loopback host, quiet
        analytics-free serving) unless the caller overrides them."""

        upload_limit_mb: float = 200.0

        def launch(self, *args, **kwargs):
            kwargs.setdefault("server_name", "127.0.0.1")
            kwargs.setdefault("max_file_size", int(self.upload_limit_mb * 1024 * 1024))
            kwargs.setdefault("share", False)
            kwargs.setdefault("footer_links", ["api"])
            kwargs.setdefault("theme", gr.themes.Soft())
            return super().launch(*args, **kwargs)

    return _DemoBlocks


def build_app(predictor, *, max_upload_mb: float = 200.0, max_frames: int = 300,
              examples_dir: str | Path | None = EXAMPLES_DIR):
    """The demo as a gr.Blocks (queue configured; `launch()` applies the upload limit and binds 127.0.0.1)."""
    import gradio as gr

    _check_limits(max_upload_mb, max_frames)
    root = Path(tempfile.mkdtemp(prefix="instructseg-demo-"))
    model_lock = threading.Lock()
    examples = _examples_index(examples_dir)
    limit_bytes = int(max_upload_mb * 1024 * 1024)
    segment_dirs: collections.deque[Path] = collections.deque()

    # -- loading media --------------------------------------------------------------------------------------
    def check_size(path: Path, label: str) -> None:
        if path.stat().st_size > limit_bytes:
            raise InputError(f"{label} is {path.stat().st_size / 2**20:.1f} MB; this demo accepts uploads up to "
                             f"{max_upload_mb:g} MB")

    def open_frames(path: Path, label: str):
        try:  # a long video is refused as soon as its frame count passes the limit, not decoded to its end
            return open_source(path, max_frames=max_frames)
        except FrameLimitError:
            raise InputError(f"{label} has more than {max_frames} frames; this demo accepts at most {max_frames} "
                             "frames (trim the video or start the demo with a larger --max-frames)") from None

    def uploaded(path) -> Path:
        if not path:
            raise InputError("no file: upload a video or an image")
        path = Path(path).resolve()
        if not path.is_relative_to(Path(gr.utils.get_upload_folder()).resolve()):
            raise InputError("only uploaded files can be opened")
        return path

    def start(old: Visit | None, path: Path, label: str, progress, *, own_copy: bool):
        progress(0, desc="reading the media")
        check_size(path, label)
        media = private_copy(path, root) if own_copy else path
        source = None
        try:
            source = open_frames(media, label)
            _close_visit(old)  # waits for a question of the old visit still running
            visit = Visit(root, predictor, source, label, media_dir=media.parent if own_copy else None)
        except BaseException:  # nothing of a visit that did not start stays open or on disk
            if source is not None:
                source.close()
            if own_copy:
                shutil.rmtree(media.parent, ignore_errors=True)
            raise
        kind = f"{len(source)} frames at {source.fps:g} fps" if source.is_video else "image"
        hint = examples.get(path.name, {}).get("instructions", []) if path.parent == examples_dir_resolved else []
        status = f"**{html.escape(label)}**: {kind}, {source.width}×{source.height}. Ask about it below."
        if hint:
            status += " Try: " + ", ".join(f"*{html.escape(h)}*" for h in hint[:3]) + "."
        with visit.lock:
            frame = _frame_view(visit, 0, [])
        return (visit, [], status, gr.update(maximum=max(len(source) - 1, 1), value=0, visible=len(source) > 1),
                frame, gr.update(value=None, visible=source.is_video),
                gr.update(value=None, visible=not source.is_video),
                gr.update(choices=[], value=[]), "", None, gr.update(choices=[], value=None))

    examples_dir_resolved = Path(examples_dir).resolve() if examples_dir else None

    @_user_errors
    def load_upload(visit, media, progress=gr.Progress()):
        path = uploaded(media)
        return start(visit, path, path.name, progress, own_copy=True)

    @_user_errors
    def load_example(visit, name, progress=gr.Progress()):
        if name not in examples:  # never joined to a path unless it is one of the listed files
            raise InputError(f"unknown example {name!r}")
        return start(visit, examples_dir_resolved / name, name, progress, own_copy=False)

    # -- asking and refining -----------------------------------------------------------------------------
    def results_view(visit: Visit, selected, frame: int, status: str):
        result = visit.result
        ids = [o.id for o in result.objects]
        selected = ids if selected is None else [i for i in selected if i in ids]
        video, image = _overlay_file(visit, selected)
        choices = [(f"object {o.id} (score {o.score:.2f})", o.id) for o in result.objects]
        with visit.lock:
            view = _frame_view(visit, frame, selected)
        return (list(visit.messages), video, image, gr.update(choices=choices, value=selected),
                _legend(result), _zip(visit), view,
                gr.update(choices=[(f"object {i}", i) for i in ids], value=ids[0] if ids else None), status)

    def run_model(progress, call):
        """`call(report)` alone on the model; the caller holds its visit's lock (taken before the model's)."""
        def report(done, total):
            progress((done, total), desc="segmenting", unit="frames")

        progress(0, desc="thinking")
        with model_lock:
            return call(report)

    @_user_errors
    def ask(visit, message, frame, progress=gr.Progress()):
        visit = _require(visit)
        _check_message(message)
        with visit.lock:  # the turn's bookkeeping too: a point added before it would be wiped from the clicks
            out = visit.next_dir()
            result = run_model(progress,
                               lambda report: visit.session.ask(message, out_dir=out, progress=report))
            visit.finish_turn(out)
            visit.clicks = {}
            visit.messages += [{"role": "user", "content": message.strip()},
                               {"role": "assistant", "content": _answer_text(result)}]
            return ("", *results_view(visit, None, int(frame or 0), _timing(visit, result)))

    def ask_from_page(visit, message, frame, progress=gr.Progress()):
        """The page's send: its message box was emptied when the message was taken (and is given back on error)."""
        return ask(visit, message, frame, progress)[1:]

    @_user_errors
    def propagate(visit, selected, frame, progress=gr.Progress()):
        visit = _require(visit)
        with visit.lock:  # the points it applies are the points it counts
            if not visit.clicks:
                raise InputError("click on a frame to add points first (pick the object and positive/negative)")
            out = visit.next_dir()
            result = run_model(progress,
                               lambda report: visit.session.propagate(out_dir=out, progress=report))
            visit.finish_turn(out)
            count = sum(len(v) for v in visit.clicks.values())
            visit.messages.append({"role": "assistant", "content": f"Refined with {count} point(s): "
                                                                  + _answer_text(result)})
            return results_view(visit, selected, int(frame or 0), _timing(visit, result))

    @_user_errors
    def add_point(visit, frame, obj, polarity, x, y, selected):
        visit = _require(visit)
        if visit.result is None or not visit.result.objects:
            raise InputError("ask for an object first: there is no mask to refine")
        if obj is None:
            raise InputError("pick the object the point belongs to")
        frame, obj = int(frame or 0), int(obj)
        if x is None or y is None:
            raise InputError("click on the frame to place a point")
        label = 0 if polarity == "negative" else 1
        with _view_lock(visit):  # not while this visitor's question runs (it resets the points)
            clicks = visit.clicks.get((frame, obj), []) + [(float(x), float(y), label)]
            visit.session.add_points(frame, obj, [c[:2] for c in clicks], [c[2] for c in clicks])
            visit.clicks[(frame, obj)] = clicks
            count = sum(len(v) for v in visit.clicks.values())
            view = _frame_view(visit, frame, selected)
        return view, (f"Added a {polarity or 'positive'} point at ({x:.0f}, {y:.0f}) for object {obj} on frame "
                      f"{frame}; {count} point(s) in all. Press **Propagate** to apply them to every frame.")

    def click(visit, frame, obj, polarity, selected, evt: gr.SelectData):
        scale = _view_scale(visit.source) if visit is not None else 1
        x, y = ((v + 0.5) / scale - 0.5 for v in evt.index)  # view pixel centre -> source pixels
        return add_point(visit, frame, obj, polarity, x, y, selected)

    @_user_errors
    def show_objects(visit, selected, frame):
        visit = _require(visit)
        with _view_lock(visit):
            if visit.result is None:
                return None, None, _frame_view(visit, int(frame or 0), selected)
            video, image = _overlay_file(visit, selected or [])
            return video, image, _frame_view(visit, int(frame or 0), selected or [])

    @_user_errors
    def show_frame(visit, frame, selected):
        visit = _require(visit)
        with _view_lock(visit):
            return _frame_view(visit, int(frame or 0), selected)

    @_user_errors
    def segment(media, instruction, progress=gr.Progress()):
        _check_message(instruction)
        path = uploaded(media)
        check_size(path, path.name)
        source = open_frames(path, path.name)
        out = Path(tempfile.mkdtemp(prefix="segment-", dir=root))
        segment_dirs.append(out)
        while len(segment_dirs) > 16:  # older results were copied to gradio's cache long ago
            shutil.rmtree(segment_dirs.popleft(), ignore_errors=True)
        try:
            def report(done, total):
                progress((done, total), desc="segmenting", unit="frames")

            progress(0, desc="thinking")
            with model_lock:
                result = predictor.segment(source, instruction, out_dir=out, progress=report)
        finally:
            source.close()
        overlay_path = out / ("overlay.mp4" if source.is_video else "overlay.png")
        return result.text, str(overlay_path) if overlay_path.exists() else None, str(_zip_dir(out, path.stem))

    # -- layout ------------------------------------------------------------------------------------------
    Blocks = _demo_blocks_class()
    with Blocks(title="instructseg demo", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        demo.upload_limit_mb = max_upload_mb
        visit = gr.State(None, delete_callback=_close_visit, time_to_live=6 * 3600)
        gr.Markdown("## instructseg: chat with a video or an image, get text and masks")
        with gr.Row():
            with gr.Column(scale=1):
                media = gr.File(label=f"Video or image (up to {max_upload_mb:g} MB, {max_frames} frames)",
                                file_types=list(MEDIA_EXTS), type="filepath", elem_id="media")
                with gr.Row():
                    example = gr.Dropdown([(v["title"], k) for k, v in examples.items()],
                                          value=next(iter(examples), None),
                                          label="or a bundled example", elem_id="example", scale=3)
                    example_btn = gr.Button("Load example", scale=1)
                status = gr.Markdown("Upload a video or an image, or load an example.", label="status",
                                     elem_id="status")
                chat = gr.Chatbot(label="Chat", height=320, elem_id="chat")
                with gr.Row():
                    message = gr.Textbox(placeholder="e.g. segment the red circle", label="message",
                                         show_label=False, scale=4, max_length=MAX_MESSAGE_CHARS, elem_id="message")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            with gr.Column(scale=1):
                overlay_video = gr.Video(label="Overlay", interactive=False, elem_id="overlay-video", loop=True)
                overlay_image = gr.Image(label="Overlay", interactive=False, visible=False, elem_id="overlay-image")
                objects = gr.CheckboxGroup(label="Objects shown", choices=[], type="value", elem_id="objects")
                legend = gr.HTML("", label="colours")
                download = gr.File(label="Masks (zip of PNGs + result.json)", interactive=False, elem_id="download")
        with gr.Accordion("Refine: click on a frame to add points, then propagate", open=True):
            with gr.Row():
                with gr.Column(scale=2):
                    frame = gr.Slider(0, 1, value=0, step=1, label="Frame", elem_id="frame")
                    frame_image = gr.Image(label="Frame (click to add a point)", interactive=False, height=360,
                                           elem_id="frame-image")
                with gr.Column(scale=1):
                    target = gr.Radio(choices=[], label="Object", elem_id="target")
                    polarity = gr.Radio(["positive", "negative"], value="positive", label="Point")
                    with gr.Row():
                        px = gr.Number(None, label="x", precision=1, minimum=0)
                        py = gr.Number(None, label="y", precision=1, minimum=0)
                    point_btn = gr.Button("Add point at x, y")
                    propagate_btn = gr.Button("Propagate", variant="primary", elem_id="propagate")
        with gr.Column(visible=False):  # the stateless API endpoint /segment
            api_media, api_text = gr.File(type="filepath", label="media"), gr.Textbox(label="instruction")
            api_answer, api_overlay = gr.Textbox(label="answer"), gr.File(label="overlay")
            api_zip = gr.File(label="masks zip")
            api_btn = gr.Button()
            api_ask = gr.Button()  # the /ask endpoint (the page itself sends through the chain below)
            pending = gr.State("")  # the message the page's question is answering

        model = dict(concurrency_id="model", concurrency_limit=1)
        view = dict(concurrency_id="view", concurrency_limit=VIEW_CONCURRENCY)
        loaded = [visit, chat, status, frame, frame_image, overlay_video, overlay_image, objects, legend, download,
                  target]
        shown = [chat, overlay_video, overlay_image, objects, legend, download, frame_image, target, status]
        load = dict(concurrency_id="load", concurrency_limit=LOAD_CONCURRENCY)
        media.upload(load_upload, [visit, media], loaded, api_name="load", **load)
        example_btn.click(load_example, [visit, example], loaded, api_name="load_example", **load)
        # the page empties the message box as soon as the message is sent and gives it back if the question fails
        # (unless something new was typed meanwhile); API clients call /ask with the message itself
        for sent in (send.click, message.submit):
            sent(lambda text: ("", text), message, [message, pending], api_name=False, queue=False) \
                .then(ask_from_page, [visit, pending, frame], shown, api_name=False, **model) \
                .failure(lambda taken, now: now or taken, [pending, message], message, api_name=False, queue=False)
        api_ask.click(ask, [visit, message, frame], [message, *shown], api_name="ask", **model)
        propagate_btn.click(propagate, [visit, objects, frame], shown, api_name="propagate", **model)
        objects.input(show_objects, [visit, objects, frame], [overlay_video, overlay_image, frame_image],
                      api_name="show_objects", **view)
        frame.change(show_frame, [visit, frame, objects], frame_image, api_name="show_frame",
                     trigger_mode="always_last", **view)
        frame_image.select(click, [visit, frame, target, polarity, objects], [frame_image, status], api_name=False,
                           **view)
        point_btn.click(add_point, [visit, frame, target, polarity, px, py, objects], [frame_image, status],
                        api_name="add_point", **view)
        api_btn.click(segment, [api_media, api_text], [api_answer, api_overlay, api_zip], api_name="segment",
                      **model)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    weakref.finalize(demo, shutil.rmtree, root, True)
    return demo


def launch(args) -> int:
    """`instructseg demo`: load the model, then serve until interrupted."""
    import torch

    from instructseg.inference.predictor import InstructSegPredictor

    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: expected 1..65535")
    _check_limits(args.max_upload_mb, args.max_frames)  # before the model loads
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here (use --device cpu)")
    predictor = InstructSegPredictor(args.model, device=args.device, llm_dtype=args.llm_dtype)
    demo = build_app(predictor, max_upload_mb=args.max_upload_mb, max_frames=args.max_frames)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"instructseg: serving on {args.host}: anyone who can reach this machine can use the demo")
    try:
        demo.launch(server_name=args.host, server_port=args.port)
    except OSError as err:
        raise InputError(f"--host {args.host} --port {args.port}: cannot serve ({err})") from None
    return 0


# ---------------------------------------------------------------------------------------------- helpers
def _user_errors(fn):
    """Bad input becomes a gr.Error: a one-line message in the browser, an error for API clients."""
    import functools

    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as err:  # noqa: BLE001 - a bug must still reach the visitor as a message, not a bare "Error"
            traceback.print_exc()
            text = " ".join(str(err).split()) or type(err).__name__
            raise gr.Error(f"something went wrong ({type(err).__name__}: {text}); the server log has the details",
                           print_exception=False) from None

    return wrapper


@contextlib.contextmanager
def _view_lock(visit: Visit):
    """The visit's lock for a view, refused (not waited for) while the visitor's own question runs, so that
    views never queue up behind a model call."""
    if not visit.lock.acquire(blocking=False):
        raise InputError("the answer is on its way: the view updates when it is done")
    try:
        yield
    finally:
        visit.lock.release()


def _check_limits(max_upload_mb: float, max_frames: int) -> None:
    if not max_upload_mb > 0:
        raise InputError(f"--max-upload-mb {max_upload_mb}: must be positive")
    if max_frames < 1:
        raise InputError(f"--max-frames {max_frames}: must be at least 1")


def _check_message(message) -> None:
    if not message or not message.strip():
        raise InputError("type an instruction first, e.g. \"segment the red circle\"")
    if len(message) > MAX_MESSAGE_CHARS:
        raise InputError(f"the message has {len(message)} characters; the limit is {MAX_MESSAGE_CHARS}")


def _require(visit: Visit | None) -> Visit:
    if visit is None:
        raise InputError("upload a video or an image (or load an example) first")
    return visit


def _examples_index(examples_dir) -> dict[str, dict]:
    """{file name: {"title", "instructions"}} from examples.json, only for files that exist in examples_dir."""
    if examples_dir is None or not (Path(examples_dir) / "examples.json").is_file():
        return {}
    index = json.loads((Path(examples_dir) / "examples.json").read_text())
    return {name: {"title": entry.get("title", name), "instructions": list(entry.get("instructions", []))}
            for name, entry in index.items()
            if Path(name).name == name and (Path(examples_dir) / name).is_file()}
