"""Media loading: every accepted image source, and precise errors for bad images and videos."""
import base64
import http.server
import io
import struct
import threading
import zlib

import av
import numpy as np
import pytest
from PIL import Image

from minicpmv.errors import ImageError, InputError, VideoError
from minicpmv.processing import load_image, load_video


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds no pixel data at all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def server(picture):
    """A local HTTP server: /ok.png serves a PNG, /big.png 2 MB, anything else 404."""
    payload = png_bytes(picture)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = {"/ok.png": payload, "/big.png": b"\0" * (2 << 20)}.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_every_image_source_gives_the_same_rgb_image(tmp_path, picture, server):
    data = png_bytes(picture)
    path = tmp_path / "pic.png"
    path.write_bytes(data)
    sources = [picture, picture.convert("RGBA"), str(path), path, data, bytearray(data),
               "data:image/png;base64," + base64.b64encode(data).decode(), server + "/ok.png"]
    for source in sources:
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (60, 40)
        assert np.array_equal(np.array(image), np.array(picture)), type(source)


def test_transparency_goes_onto_white_and_exif_rotation_applies(tmp_path):
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.array(load_image(clear)).min() == 255
    wide = Image.new("RGB", (30, 10), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    path = tmp_path / "rotated.jpg"
    wide.save(path, exif=exif)
    assert load_image(path).size == (10, 30)


def test_corrupt_image_file(tmp_path, picture):
    path = tmp_path / "broken.png"
    path.write_bytes(png_bytes(picture)[:200])  # header intact, pixel data cut off
    with pytest.raises(ImageError, match=r"broken\.png: image data is corrupt or truncated"):
        load_image(path)


def test_non_image_bytes(tmp_path):
    with pytest.raises(ImageError, match=r"<11 bytes>: not a recognizable image"):
        load_image(b"hello world")
    path = tmp_path / "notes.txt"
    path.write_text("just some text")
    with pytest.raises(ImageError, match=r"notes\.txt: not a recognizable image"):
        load_image(str(path))


def test_image_over_pixel_limit_is_rejected_before_decoding(picture):
    with pytest.raises(ImageError, match=r"60x40 = 2400 pixels, over the limit of 1000 pixels"):
        load_image(png_bytes(picture), max_pixels=1000)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(picture, max_pixels=1000)
    # only the header is read: a 9000x8000 claim with no pixel data fails on size, not corruption
    with pytest.raises(ImageError, match=r"9000x8000 = 72000000 pixels, over the limit of 50000000"):
        load_image(png_header_only(9000, 8000))


def test_decompression_bomb_is_an_image_error():
    with pytest.raises(ImageError, match="too large"):
        load_image(png_header_only(40000, 40000), max_pixels=10**10)


def test_bad_sources(server):
    with pytest.raises(ImageError, match="no such file"):
        load_image("/nonexistent/cat.png")
    with pytest.raises(ImageError, match="HTTP 404"):
        load_image(server + "/missing.png")
    with pytest.raises(ImageError, match="over the limit of 1000 bytes"):
        load_image(server + "/big.png", max_bytes=1000)
    with pytest.raises(ImageError, match="invalid base64"):
        load_image("data:image/png;base64,@@@")
    with pytest.raises(ImageError, match="unsupported media source"):
        load_image(12345)
    assert issubclass(ImageError, InputError) and issubclass(VideoError, InputError)


def write_clip(path, frames=12, fps=6):
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
    for i in range(frames):
        image = np.full((24, 32, 3), i * 20, np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def test_video_from_path_and_bytes(tmp_path):
    path = tmp_path / "clip.mp4"
    write_clip(path)
    clip = load_video(path)
    assert clip.frames.shape == (12, 24, 32, 3) and clip.frames.dtype == np.uint8
    assert (clip.meta.fps, clip.meta.duration, clip.meta.total_num_frames) == (6.0, 2.0, 12)
    again = load_video(path.read_bytes(), frame_indices=[0, 6, 6, 11])
    assert again.indices == [0, 6, 11] and np.array_equal(again.frames, clip.frames[[0, 6, 11]])
    assert np.array_equal(again.frames_at([6, 0, 6]), clip.frames[[6, 0, 6]])


def test_empty_video(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty\.mp4: video is empty \(0 bytes\)"):
        load_video(path)
    with pytest.raises(VideoError, match=r"video is empty \(0 bytes\)"):
        load_video(b"")


def test_text_file_as_video(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not a video\n" * 20)
    with pytest.raises(VideoError, match=r"notes\.txt: not a readable video container"):
        load_video(str(path))


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "tone.wav"
    container = av.open(str(path), "w")
    stream = container.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    with pytest.raises(VideoError, match=r"tone\.wav: contains no video stream \(streams: audio\)"):
        load_video(path)


def test_truncated_video(tmp_path):
    path = tmp_path / "clip.mp4"
    write_clip(path)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[:300])
    with pytest.raises(VideoError, match=r"cut\.mp4: "):
        load_video(cut)
