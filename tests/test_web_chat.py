"""The web chat page in a real browser: Playwright drives headless Chromium (Debian's package;
scripts/test.sh installs it) against a real `minicpmv serve` on a tiny checkpoint. Every answer
the page shows is compared with the API's answer to the same request, sent here with httpx.
Screenshots go to test-artifacts/web-chat/ (gitignored)."""
from __future__ import annotations

import base64
import io
import json
import random
import shutil
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from minicpmv.newlines import unescape_newlines
from test_server_support import API_KEY, MODEL_NAME, ServerProcess, photo, video_bytes

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "web-chat"
CASES = json.loads((Path(__file__).parent / "data" / "newline_cases.json").read_text())
MAX_TOKENS = 12
SCRIPT = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> **bold** `x\\ny`\\nnext'


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Chromium is not installed: `apt-get install -y chromium` (scripts/test.sh does it)"
    return path


@pytest.fixture(scope="module")
def server(tiny46_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    s = ServerProcess(tiny46_dir, "--max-image-pixels", "1000000", log_path=log)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path())
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page with the API key already entered through the page's own prompt."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    errors = []  # script exceptions, and console errors such as Content-Security-Policy violations
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and "Failed to load resource" not in m.text  # 401, 400: expected
            and errors.append(m.text))
    page.goto(server.base + "/")
    expect(page.locator("#key-dialog")).to_be_visible()
    page.fill("#key-input", API_KEY)
    page.click("#key-save")
    expect(page.locator("#model option")).to_have_text([MODEL_NAME])
    settings(page, temperature="0", max_tokens=str(MAX_TOKENS))
    yield page
    context.close()
    assert not errors, errors


def settings(page, *, temperature=None, max_tokens=None, thinking=None, markdown=None, extra=None, tools=None):
    if page.locator("#settings").is_hidden():
        page.click("#settings-toggle")
    fields = (("#temperature", temperature), ("#max-tokens", max_tokens), ("#extra", extra), ("#tools", tools))
    for selector, value in fields:
        if value is not None:
            page.fill(selector, value)
    for selector, value in (("#thinking", thinking), ("#markdown", markdown)):
        if value is not None:
            page.locator(selector).set_checked(value)
    page.click("#settings-toggle")


def send(page, text, files=()):
    """One turn through the page; returns the locator of the finished assistant message."""
    done = page.locator(".msg.assistant[data-finish]").count()
    if files:
        page.set_input_files("#attach", [str(f) for f in files])
        expect(page.locator("#attachments .thumb")).to_have_count(len(files))
    page.fill("#prompt", text)
    page.click("#send")
    finished = page.locator(".msg.assistant[data-finish]").nth(done)
    expect(finished).to_be_visible(timeout=60_000)
    return finished


def api(server, messages, **fields):
    body = {"model": MODEL_NAME, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS,
            "chat_template_kwargs": {"enable_thinking": False}, **fields}
    r = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=120,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def text_part(text):
    return {"type": "text", "text": text}


def test_newline_rules_match_the_python_module(page):
    rng = random.Random(1)
    alphabet = ["\\", "n", "\\n", "`", "```", "~~~", "$", "$$", "\\(", "\\)", "\\[", "\\]", "\n", " ", "a", "5"]
    inputs = [c["input"] for c in CASES]
    inputs += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(300)]
    got = page.evaluate("(xs) => xs.map((x) => window.unescapeNewlines(x))", inputs)
    for text, js in zip(inputs, got):
        assert js == unescape_newlines(text), repr(text)
    for case, js in zip(CASES, got):
        assert js == case["expected"], case["name"]


def test_text_turns_show_the_api_answer(page, server):
    settings(page, markdown=False)  # the answer's visible text is then exactly the displayed string
    first = send(page, "Hello there")
    ref = api(server, [{"role": "user", "content": [text_part("Hello there")]}])
    assert first.locator(".answer").inner_text() == unescape_newlines(ref["content"])
    assert first.locator(".answer").text_content() == unescape_newlines(ref["content"])
    second = send(page, "And then?")  # multi-turn: the page sends the history back
    history = [{"role": "user", "content": [text_part("Hello there")]},
               {"role": "assistant", "content": ref["content"]}, {"role": "user", "content": [text_part("And then?")]}]
    ref2 = api(server, history)
    assert second.locator(".answer").text_content() == unescape_newlines(ref2["content"])
    assert "tokens" in second.locator(".meta").inner_text()
    page.screenshot(path=ARTIFACTS / "text-turns.png", full_page=True)


def test_image_and_video_turns(page, server, tmp_path):
    image = tmp_path / "photo.png"
    photo(180, 240, 7).save(image)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(video_bytes(seconds=2))
    shown = send(page, "What is in this image?", [image])
    expect(page.locator(".msg.user .thumb.image img")).to_have_count(1)
    part = {"type": "image_url", "image_url": {"url": data_url(image, "image/png")}}
    ref = api(server, [{"role": "user", "content": [part, text_part("What is in this image?")]}])
    assert shown.locator(".answer").get_attribute("data-text") == unescape_newlines(ref["content"])
    page.click("#new-chat")
    shown = send(page, "What happens?", [clip])
    expect(page.locator(".msg.user .thumb.video video")).to_have_count(1)
    part = {"type": "video_url", "video_url": {"url": data_url(clip, "video/mp4")}}
    ref = api(server, [{"role": "user", "content": [part, text_part("What happens?")]}])
    assert shown.locator(".answer").get_attribute("data-text") == unescape_newlines(ref["content"])
    page.screenshot(path=ARTIFACTS / "video-turn.png", full_page=True)


def test_stop_a_stream(page, server):
    settings(page, max_tokens="3000", extra='{"ignore_eos": true}')
    page.fill("#prompt", "Write a long story.")
    page.click("#send")
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator(".msg.assistant .answer")).not_to_have_text("", timeout=60_000)
    page.click("#stop")
    stopped = page.locator(".msg.assistant[data-finish]")
    expect(stopped).to_have_attribute("data-finish", "stopped")
    expect(page.locator("#send")).to_be_visible()
    m = server.wait_idle(timeout=30)  # the server aborted the sequence when the page hung up
    assert m["minicpmv_sequences_running"] == 0
    assert len(stopped.locator(".answer").get_attribute("data-text")) > 0
    page.screenshot(path=ARTIFACTS / "stopped.png", full_page=True)


def test_thinking_toggle(page, server):
    settings(page, thinking=True)
    shown = send(page, "Think first.")
    ref = api(server, [{"role": "user", "content": [text_part("Think first.")]}],
              chat_template_kwargs={"enable_thinking": True})
    reasoning = shown.locator("details.reasoning")
    expect(reasoning).to_be_visible()
    assert reasoning.get_attribute("open") is None  # collapsed above the answer
    assert ref["reasoning_content"]
    assert reasoning.locator(".reasoning-text").text_content() == unescape_newlines(ref["reasoning_content"])
    reasoning.locator("summary").click()
    page.screenshot(path=ARTIFACTS / "thinking.png", full_page=True)
    settings(page, thinking=False)
    plain = send(page, "No thinking now.")
    expect(plain.locator("details.reasoning")).to_be_hidden()


def test_model_output_is_text_never_markup(page, server, tmp_path):
    # constrained decoding makes the tiny model write markup; the page must show it as text
    settings(page, max_tokens="80", extra=json.dumps({"structured_outputs": {"choice": [SCRIPT]}}))
    shown = send(page, "Say something dangerous.")
    answer = shown.locator(".answer")
    assert answer.get_attribute("data-text") == unescape_newlines(SCRIPT)
    assert "<script>window.pwned = 1</script>" in answer.text_content()
    assert answer.locator("script, img").count() == 0
    assert answer.locator("strong").text_content() == "bold"
    assert answer.locator("code").text_content() == "x\\ny"  # inline code keeps its backslash-n
    assert page.evaluate("window.pwned") is None
    evil = tmp_path / '<img src=x onerror="window.pwned=3">.png'
    photo(40, 40, 1).save(evil)
    page.set_input_files("#attach", [str(evil)])
    expect(page.locator("#attachments .thumb .name")).to_have_text(evil.name)
    assert page.locator("#attachments img").count() == 1 and page.evaluate("window.pwned") is None
    page.screenshot(path=ARTIFACTS / "markup-as-text.png", full_page=True)


def test_errors_are_readable_and_the_turn_can_be_retried(page, tmp_path):
    big = tmp_path / "big.png"
    photo(1100, 1000, 2).save(big)  # 1.1M pixels; the server takes 1M
    page.set_input_files("#attach", [str(big)])
    page.fill("#prompt", "Too big?")
    page.click("#send")
    error = page.locator(".msg.error")
    expect(error).to_contain_text("HTTP 400")
    expect(error).to_contain_text("pixels")
    expect(page.locator("#prompt")).to_have_value("Too big?")  # given back to retry
    expect(page.locator("#attachments .thumb")).to_have_count(1)
    page.screenshot(path=ARTIFACTS / "error.png", full_page=True)


def test_drop_and_paste_attach(page):
    png = io.BytesIO()
    photo(30, 30, 3).save(png, format="PNG")
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = () => {
            const t = new DataTransfer();
            t.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
            return t;
        };
        const opts = (key) => ({[key]: transfer(), bubbles: true, cancelable: true});
        document.dispatchEvent(new DragEvent("drop", opts("dataTransfer")));
        document.getElementById("prompt").dispatchEvent(new ClipboardEvent("paste", opts("clipboardData")));
    }""", base64.b64encode(png.getvalue()).decode())
    expect(page.locator("#attachments .thumb")).to_have_count(2)
    page.locator("#attachments .thumb .remove").first.click()
    expect(page.locator("#attachments .thumb")).to_have_count(1)


def test_phone_width_layout(browser, server, tmp_path):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.add_init_script(f"localStorage.setItem('minicpmv.apiKey', {json.dumps(API_KEY)})")
    page.goto(server.base + "/")
    expect(page.locator("#model option")).to_have_text([MODEL_NAME])
    image = tmp_path / "photo.png"
    photo(120, 200, 4).save(image)
    settings(page, temperature="0", max_tokens="8")
    send(page, "A long question that wraps onto several lines on a narrow phone screen, about this image.", [image])
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    for selector in ("#send", "#prompt", "#attach-label"):
        box = page.locator(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
    page.screenshot(path=ARTIFACTS / "phone.png", full_page=True)
    context.close()


def test_tool_calls_are_shown(page):
    # the server's tool-call parsing is tested in test_server_api / test_tool_calls; here the page's
    # drawing of streamed tool_calls deltas, from a canned stream in the server's exact format
    chunks = [{"delta": {"role": "assistant", "content": ""}},
              {"delta": {"content": "Checking."}},
              {"delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {
                  "name": "get_weather", "arguments": '{"city": "<b>Paris</b>"}'}}]}},
              {"delta": {}, "finish_reason": "tool_calls"}]
    frame = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL_NAME}
    body = "".join(f"data: {json.dumps({**frame, 'choices': [{'index': 0, **c}]})}\n\n" for c in chunks)
    body += "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=200, body=body,
                                                                       content_type="text/event-stream"))
    shown = send(page, "Weather in Paris?")
    card = shown.locator(".tool-call")
    expect(card.locator(".fn")).to_have_text("tool call: get_weather")
    assert json.loads(card.locator("pre").text_content()) == {"city": "<b>Paris</b>"}
    assert card.locator("b").count() == 0
    assert shown.get_attribute("data-finish") == "tool_calls"
    page.screenshot(path=ARTIFACTS / "tool-call.png", full_page=True)
