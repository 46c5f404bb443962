"""MiniCPM-V 4.7 through every front door, on tiny dense and MoE checkpoints: the Python API
against transformers' generate (image prompt: the canvas positions travel from prepare() to the
engine), thinking per request, beam search, the `minicpmv chat` command, and `minicpmv serve`
(image answers token for token equal to the Python API, reasoning split, tool calls)."""
import json
import subprocess
import sys

import pytest
import torch

import minicpmv
from test_server_api import CALL, WEATHER, ask
from test_server_support import ServerProcess, image_part, photo, user

KINDS = ["dense", "moe_fused"]
FIXTURE = {"dense": "tiny47_dense_dir", "moe": "tiny47_moe_dir", "moe_fused": "tiny47_moe_fused_dir"}


@pytest.fixture(scope="module", params=KINDS)
def folder(request):
    return request.getfixturevalue(FIXTURE[request.param])


@pytest.fixture(scope="module")
def local(folder):
    return minicpmv.load(folder, dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    s = ServerProcess(folder, "--max-concurrency", "4", log_path=tmp_path_factory.mktemp("logs") / "server.log")
    yield s
    s.stop()


def reference(folder, image, question):
    from transformers import AutoProcessor, MiniCPMV4_7ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    ref = MiniCPMV4_7ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return ref, processor(text=[text], images=[[image]], return_tensors="pt")


def test_chat_matches_transformers_generate(local, folder):
    image, question = photo(390, 1130, 3), "Describe this image in detail."
    ref, inputs = reference(folder, image, question)
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    reply = local.chat(msgs=[{"role": "user", "content": [image, question]}], do_sample=False, max_new_tokens=16)
    assert reply.usage["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert reply.raw == local.tokenizer.decode(ref_ids, skip_special_tokens=False)


def test_beam_search_matches_transformers(local, folder):
    """Beam search prefills and decodes at the canvas positions too."""
    image, question = photo(300, 500, 4), "What is it?"
    ref, inputs = reference(folder, image, question)
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=3, eos_token_id=None,
                           pad_token_id=0)
    ref_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    reply = local.chat(msgs=[{"role": "user", "content": [image, question]}], do_sample=False, max_new_tokens=8,
                       num_beams=3)
    assert reply.raw == local.tokenizer.decode(ref_ids, skip_special_tokens=False)


def test_cli_chat(folder, local, tmp_path):
    path = tmp_path / "photo.png"
    photo(300, 500, 0).save(path)
    out = subprocess.run([sys.executable, "-m", "minicpmv.cli", "chat", "--model", str(folder), "--image", str(path),
                          "--greedy", "--max-new-tokens", "6", "--dtype", "float32", "--device", "cpu",
                          "What is in the picture?"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    content = [{"type": "image", "image": str(path)}, "What is in the picture?"]
    ref = local.chat(msgs=[{"role": "user", "content": content}], do_sample=False, max_new_tokens=6)
    assert out.stdout == str(ref) + "\n"


def test_server_image_answer_equals_the_python_api(server, local):
    image = photo(400, 700, 6)
    reply = ask(server.client(), user(image_part(image), "What is in this image?"), max_tokens=10)
    ref = local.chat(msgs=[{"role": "user", "content": [image, "What is in this image?"]}], do_sample=False,
                     max_new_tokens=10)
    assert reply.choices[0].message.content == str(ref)
    assert reply.usage.prompt_tokens == ref.usage["prompt_tokens"]


def test_server_thinking_per_request(server, local):
    messages = [{"role": "user", "content": "Think about the number seven."}]
    on = ask(server.client(), messages, max_tokens=10, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    ref = local.chat(msgs=messages, enable_thinking=True, do_sample=False, max_new_tokens=10)
    assert on.choices[0].message.reasoning_content == ref.reasoning
    off = ask(server.client(), messages, max_tokens=10)
    assert off.choices[0].message.reasoning_content is None and off.choices[0].message.content


def test_server_tool_call(server):
    reply = ask(server.client(), user("What is the weather in Paris?"), tools=WEATHER, max_tokens=60,
                extra_body={"structured_outputs": {"grammar": CALL}})
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
