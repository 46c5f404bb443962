"""Loading checkpoints: sharded safetensors, untied heads, dtypes, hub ids and their errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import minicpmv
from minicpmv.cpu.plan import BF16
from minicpmv.engine.prefill import prompt_forward
from minicpmv.errors import ModelNotFoundError
from minicpmv.hub import resolve_model_path
from minicpmv.layers.fp16_packed import PackedFP16Linear
from minicpmv.layers.weight_formats import Bf16Linear, TiedEmbedding
from minicpmv.loading import load_model
from tiny46 import build_tiny_46


def last_logits(model, ids):
    hidden, _ = prompt_forward(model, ids)
    return model.logits(hidden[0, -1])


IDS = torch.tensor([248045, 846, 198, 9419, 11, 1814, 0, 248046, 198, 248045, 74455, 198])


def test_sharded_checkpoint_loads_like_the_single_file(tiny46_dir, tmp_path):
    tensors = load_file(tiny46_dir / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((tiny46_dir / "config.json").read_text())
    single, _ = load_model(tiny46_dir, "float32", "cpu", progress=False)
    sharded, _ = load_model(tmp_path, "float32", "cpu", progress=False)
    with torch.no_grad():
        assert torch.equal(last_logits(single, IDS), last_logits(sharded, IDS))


def test_untied_lm_head_matches_transformers(tmp_path):
    from transformers import MiniCPMV4_6ForConditionalGeneration

    folder = build_tiny_46(tmp_path / "untied", seed=3, tie_word_embeddings=False)
    ours, _ = load_model(folder, "float32", "cpu", progress=False)
    assert ours.lm_head.weight.data_ptr() != ours.language_model.embed_tokens.weight.data_ptr()
    ref = MiniCPMV4_6ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (last_logits(ours, IDS) - ref(input_ids=IDS[None]).logits[0, -1]).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights_on_cpu(tiny46_dir, dtype):
    """On CPU, half precision stores the matrices narrow and computes in fp32: logits stay close
    to the fp32 model's, memory for the matrices halves."""
    ref, _ = load_model(tiny46_dir, "float32", "cpu", progress=False)
    half, _ = load_model(tiny46_dir, dtype, "cpu", progress=False)
    embed = half.language_model.embed_tokens  # on the bf16_dot plan it reads the lm_head's tiles
    stored = embed._head[0].weight if isinstance(embed, TiedEmbedding) else embed.weight
    assert stored.dtype == getattr(torch, dtype) and half.dtype == torch.float32
    # the per-token matrices: fbgemm fp16 on x86, unless the CPU plan runs bf16 matrices as they are (AMX)
    bf16_text = half.kernel_plan.text16 == BF16 and dtype == "bfloat16"
    assert isinstance(half.lm_head, Bf16Linear if bf16_text else PackedFP16Linear)
    with torch.no_grad():
        a, b = last_logits(ref, IDS), last_logits(half, IDS)
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999


def test_auto_dtype_on_cpu_keeps_an_fp32_checkpoint_fp32(tiny46_dir):
    model, _ = load_model(tiny46_dir, "auto", "cpu", progress=False)
    assert model.lm_head.weight.dtype == torch.float32


def test_auto_device_takes_the_cpu_for_cpu_only_options(tiny46_dir, monkeypatch):
    """On a machine with a GPU, device "auto" means CUDA, unless the load asks for a CPU weight format
    or an ISA level: then the CPU (a GPU machine's `minicpmv chat --weights int8` runs on its CPU)."""
    from minicpmv.loading import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto").type == pick_device(None).type == "cuda"
    assert pick_device("auto", cpu_options=True).type == pick_device(None, cpu_options=True).type == "cpu"
    assert pick_device("cuda:1", cpu_options=True) == torch.device("cuda:1")  # an explicit device stays
    model, _ = load_model(tiny46_dir, "bfloat16", None, progress=False, weights="int8")
    assert next(model.parameters()).device.type == "cpu"


def test_hub_id_is_downloaded_with_huggingface_hub(tiny46_dir, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision))
        return str(tiny46_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model_path("openbmb/MiniCPM-V-4.6", revision="main") == tiny46_dir
    assert calls == [("openbmb/MiniCPM-V-4.6", "main")]


def test_offline_hub_id_names_what_to_pass_instead(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="local folder"):
        minicpmv.load("openbmb/MiniCPM-V-4.6")


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_path(tmp_path)
    with pytest.raises(ModelNotFoundError, match="neither a local folder nor a hub id"):
        resolve_model_path(str(tmp_path / "nope"))
