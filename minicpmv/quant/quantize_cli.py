"""`minicpmv quantize`: GPTQ W4A16 (or other bits) for a dense MiniCPM-V checkpoint.

    minicpmv quantize --model ./MiniCPM-V-4.6 --out ./MiniCPM-V-4.6-GPTQ \\
        [--bits 4] [--group-size 128] [--desc-act] [--sym | --asym] [--format gptq|gptq_v2]
        [--calibration FOLDER_OR_FILE] [--num-samples 128] [--max-tokens 512]

Only the LLM's decoder-layer linears are quantized (the recipe's `modules_in_block_to_quantize`:
attention q/k/v, o; DeltaNet in_proj_qkv/in_proj_z, out_proj; MLP gate/up, down); the vision
tower, merger/resampler, embeddings, norms and lm_head are copied unchanged. The output folder
has config.json with `quantization_config` (+ quantize_config.json), the safetensors weights in
the GPTQ layout and every other file of the source folder (tokenizer, templates, processor
configs), so transformers (+ optimum + gptqmodel), vLLM and minicpmv itself load it.

Calibration (--calibration):
* a .jsonl / .json file: one sample per line / list item, each either {"text": ...} (raw text,
  tokenized as is), {"messages": [...]} (chat messages with image parts, rendered with the
  checkpoint's chat template and preprocessed exactly like chat()), or {"image": PATH, "text":
  PROMPT, "answer": OPTIONAL} (one image question, as a chat);
* a .txt file: samples separated by blank lines, raw text;
* a folder: every image in it becomes a chat sample (prompt from a same-named .txt, else a
  describe-this-image prompt), and every .txt/.jsonl/.json file in it is read as above.
Without --calibration a small built-in set is used: varied English/Chinese/code text plus
synthetic images through the real image preprocessing. That is enough to exercise the
algorithm; for a production checkpoint pass real data (e.g. 128 samples of 512 tokens).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .apply import GPTQConfig, _checkpoint_name, llm_block_prefix, select_gptq_targets
from .gptq import GPTQParams, QuantizeResult, quantize_model
from .gptq_format import GPTQSpec

# The released recipe's sequential groups (union of the families: absent modules are dropped).
DEFAULT_SEQUENTIAL_GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["linear_attn.in_proj_qkv", "linear_attn.in_proj_z"],
    ["linear_attn.out_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DESCRIBE = "Describe this image in detail."

BUILTIN_TEXTS = [
    "The river bends twice before it reaches the old mill, where the water slows and turns green under the "
    "willows. In spring the banks flood and the path to the bridge disappears for weeks.",
    "To make a simple bread, mix 500 g of flour, 10 g of salt, 7 g of dry yeast and 350 ml of warm water. "
    "Knead for ten minutes, let it rise for an hour, shape it, and bake at 230 degrees for 35 minutes.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])",
    "Question: A train leaves at 9:40 and arrives at 13:15. How long is the trip?\nAnswer: From 9:40 to 13:40 "
    "is four hours; 13:15 is 25 minutes earlier, so the trip takes 3 hours and 35 minutes.",
    "光合作用是植物利用光能，把二氧化碳和水转化为葡萄糖并释放氧气的过程。它主要发生在叶绿体中。",
    "The committee reviewed the quarterly figures: revenue grew 12 percent, costs rose 4 percent, and the "
    "backlog of orders reached its highest level since the factory reopened.",
    "SELECT name, COUNT(*) AS visits FROM logs WHERE day >= '2024-01-01' GROUP BY name ORDER BY visits DESC;",
    "Dear Ms. Alvarez, thank you for your letter of 3 March. The replacement part has been shipped and "
    "should arrive within five working days. Kind regards, the support team.",
    "In the chart, the blue line shows monthly rainfall and the orange bars show the average temperature; "
    "the wettest month is November with 142 mm.",
    "今天天气很好，我们去公园散步，看到很多人在放风筝，孩子们在草地上奔跑。",
    "The theorem states that every bounded monotone sequence of real numbers converges. The proof uses the "
    "least upper bound property: the limit is the supremum of the sequence's values.",
    "<table><tr><th>City</th><th>Population</th></tr><tr><td>Lyon</td><td>522,000</td></tr></table>",
]


# -- calibration -----------------------------------------------------------------------------

def synthetic_images(n: int, seed: int = 0):
    """Deterministic test-card-like pictures (gradients, blocks, stripes, text-like marks)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.RandomState(seed)
    out = []
    for k in range(n):
        h, w = [(448, 448), (336, 672), (700, 500), (256, 256)][k % 4]
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), ((x // 16 + y // 16) % 2) * 200], -1)
        img = Image.fromarray(np.clip(base + rng.randint(0, 30, (h, w, 3)), 0, 255).astype("uint8"))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.randint(0, w - 40)), int(rng.randint(0, h - 40))
            draw.rectangle([x0, y0, x0 + int(rng.randint(10, 120)), y0 + int(rng.randint(10, 120))],
                           fill=tuple(int(v) for v in rng.randint(0, 255, 3)))
        draw.text((10, 10), f"sample {k}: 3.14 kg, 42 cm", fill=(0, 0, 0))
        out.append(img)
    return out


def _read_items(path: Path) -> list:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return data if isinstance(data, list) else [data]
    if path.suffix == ".txt":
        return [{"text": p.strip()} for p in path.read_text().split("\n\n") if p.strip()]
    raise ValueError(f"calibration file {path} must be .jsonl, .json or .txt")


def calibration_items(source: str | Path | None, with_images: bool = True) -> list:
    """The raw calibration items (see the module doc) from a file, a folder or the built-in set."""
    if source is None:
        items = [{"text": t} for t in BUILTIN_TEXTS]
        if with_images:
            for k, img in enumerate(synthetic_images(4)):
                items.insert(2 * k + 1, {"image": img, "text": DESCRIBE,
                                         "answer": "The picture shows coloured blocks on a gradient background."})
        return items
    path = Path(source)
    if path.is_file():
        return _read_items(path)
    if not path.is_dir():
        raise FileNotFoundError(f"calibration source {path} does not exist")
    items = []
    for f in sorted(path.iterdir()):
        if f.suffix.lower() in IMAGE_SUFFIXES:
            prompt = f.with_suffix(".txt")
            items.append({"image": str(f), "text": prompt.read_text().strip() if prompt.is_file() else DESCRIBE})
        elif f.suffix in (".jsonl", ".json") or (f.suffix == ".txt" and not any(
                f.with_suffix(s).exists() for s in IMAGE_SUFFIXES)):
            items.extend(_read_items(f))
    return items


def prepare_samples(items: list, tokenizer, family=None, max_tokens: int = 512, **media) -> list[dict]:
    """Items -> model inputs {"input_ids": LongTensor [T], "vision": [VisionInputs]}. Chat items need
    a family adapter (the real chat preprocessing, `media` are its options such as max_slice_nums);
    without one they are skipped."""
    samples = []
    for item in items:
        if "messages" in item or "image" in item:
            if family is None:
                continue
            msgs = item.get("messages")
            if msgs is None:
                msgs = [{"role": "user", "content": [{"type": "image", "image": item["image"]}, item.get("text", DESCRIBE)]}]
                if item.get("answer"):
                    msgs.append({"role": "assistant", "content": item["answer"]})
            prepared = family.prepare(msgs, **media)
            ids, vision = prepared.input_ids, prepared.vision
            if len(ids) > max_tokens and vision:  # never cut through image placeholders
                max_len = len(ids)
            else:
                max_len = max_tokens
            samples.append({"input_ids": torch.tensor(ids[:max_len], dtype=torch.long), "vision": vision})
        else:
            ids = tokenizer.encode(item["text"], add_special_tokens=False).ids[:max_tokens]
            if ids:
                samples.append({"input_ids": torch.tensor(ids, dtype=torch.long), "vision": []})
    if not samples:
        raise ValueError("no usable calibration samples")
    return samples


# -- running our engine models layer by layer ------------------------------------------------

def engine_run_sample(model):
    """Forward of one calibration sample through an engine model (vision, scatter, text)."""
    from ..engine.state import ForwardBatch, SequenceState

    device = next(model.parameters()).device

    def run(sample):
        ids = sample["input_ids"].to(device)
        feats: dict[int, torch.Tensor] = {}
        for v in sample.get("vision", ()):
            f = model.encode_vision(v.pixel_values.to(device), v.target_sizes, v.downsample_mode, **v.extra)
            feats[v.token_id] = torch.cat([feats[v.token_id], f]) if v.token_id in feats else f
        embeds = model.embed(ids, feats)
        state = SequenceState.allocate(model.state_spec(), len(ids), model.dtype, device)
        return model(embeds, ForwardBatch([state], torch.arange(len(ids), device=device)[None]))

    return run


def engine_compact(args, kwargs):
    """Captured layer-0 inputs keep only the positions of their ForwardBatch: the per-sequence
    caches allocated for the capture forward are rebuilt fresh by `engine_call_layer`."""
    from ..engine.state import ForwardBatch

    return (args[0], ForwardBatch([], args[1].positions), *args[2:]), kwargs


def engine_call_layer(model):
    """Run decoder layer i on captured inputs (x, batch, layer_idx, *rest) with fresh state."""
    from ..engine.state import ForwardBatch, SequenceState

    specs = model.state_spec()

    def call(layer, i, args, kwargs):
        x, batch = args[0], args[1]
        layers = [None] * len(specs)
        layers[i] = SequenceState.allocate([specs[i]], x.shape[1], x.dtype, x.device).layers[0]
        fresh = ForwardBatch([SequenceState(layers)], batch.positions)
        return layer(x, fresh, i, *args[3:], **kwargs)

    return call


# -- the whole job ---------------------------------------------------------------------------

def quantization_config_dict(spec: GPTQSpec, params: GPTQParams, groups: list[list[str]]) -> dict:
    from .. import __name__ as pkg

    try:
        from importlib.metadata import version
        ours = f"{pkg}:{version(pkg)}"
    except Exception:
        ours = pkg
    return {
        "bits": spec.bits, "group_size": spec.group_size, "desc_act": spec.desc_act, "sym": spec.sym,
        "damp_percent": params.damp_percent, "damp_auto_increment": params.damp_auto_increment,
        "static_groups": params.static_groups, "true_sequential": True, "lm_head": False,
        "quant_method": "gptq", "checkpoint_format": spec.format, "format": spec.format, "pack_dtype": "int32",
        "modules_in_block_to_quantize": groups,
        "meta": {"quantizer": [ours]},
    }


def quantize_folder(model_folder: str | Path, out_folder: str | Path, spec: GPTQSpec = GPTQSpec(),
                    params: GPTQParams = GPTQParams(), calibration: str | Path | None = None,
                    num_samples: int = 128, max_tokens: int = 512, progress: bool = True,
                    samples: list | None = None, dtype: str = "auto") -> QuantizeResult:
    """Quantize the dense checkpoint in `model_folder` into `out_folder`; returns the result
    (packed tensors and per-layer GPTQ/RTN error figures). The model is loaded on the CPU with
    loading's "auto" policy (a bf16 checkpoint keeps bf16 matrices with fp32 compute, so an 8B
    model fits in 24 GB) and its linears left unpacked, since GPTQ reads their weights; GPTQ
    itself always works on fp32 copies of one layer's weights and Hessians."""
    from tokenizers import Tokenizer

    from ..loading import load_model

    src, out = Path(model_folder), Path(out_folder)
    if src.resolve() == out.resolve():
        raise ValueError("--out must differ from --model")
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')})")
    model, _ = load_model(src, dtype, "cpu", progress=progress, pack_per_token=False)
    if samples is None:
        tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
        family = None
        try:
            from ..families import adapter_for
            family = adapter_for(src, config, tokenizer)
        except (ImportError, NotImplementedError):  # no chat preprocessing for this family: text only
            family = None
        items = calibration_items(calibration, with_images=family is not None)[:num_samples]
        samples = prepare_samples(items, tokenizer, family, max_tokens)

    prefix = llm_block_prefix(model)
    present = {n.split(".", len(prefix.split(".")) + 1)[-1] for n, _ in model.named_modules() if n.startswith(prefix + ".")}
    groups = [[m for m in g if m in present] for g in DEFAULT_SEQUENTIAL_GROUPS]
    groups = [g for g in groups if g]
    qcfg = GPTQConfig(base=spec, modules_in_block_to_quantize=groups)
    targets = select_gptq_targets(model, qcfg)
    t0 = time.perf_counter()
    result = quantize_model(model, model.get_submodule(prefix), prefix, targets, samples, engine_run_sample(model),
                            engine_call_layer(model), params, groups, progress, compact=engine_compact)
    if progress:
        print(f"quantized {len(targets)} linears in {time.perf_counter() - t0:.1f} s "
              f"({len(samples)} calibration samples, {sum(len(s['input_ids']) for s in samples)} tokens)")
    write_quantized_checkpoint(src, out, model, result, quantization_config_dict(spec, params, groups))
    return result


def write_quantized_checkpoint(src: Path, out: Path, model, result: QuantizeResult, qconfig: dict,
                               shard_bytes: int = 2 << 30) -> None:
    """Source tensors with each quantized linear's weight (and bias) replaced by its GPTQ tensors;
    every other file of the source folder copied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..weights import checkpoint_files

    out.mkdir(parents=True, exist_ok=True)
    replaced = {_checkpoint_name(model, n): t for n, t in result.tensors.items()}
    drop = {f"{m}.{p}" for m in replaced for p in ("weight", "bias")}
    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(src):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in drop:
                    tensors[key] = f.get_tensor(key)
    for m, packed in replaced.items():
        for part, t in packed.items():
            tensors[f"{m}.{part}"] = t.contiguous()

    for old in list(out.glob("*.safetensors")) + [out / "model.safetensors.index.json"]:
        if old.exists():
            old.unlink()
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensors[key]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    skip = {"config.json", "quantize_config.json", "model.safetensors.index.json"}
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in skip:
            shutil.copyfile(f, out / f.name)
    for f in out.glob("*.safetensors"):  # safetensors writes 0600; give them the mode any new file gets
        _usual_mode(f)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = qconfig
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")


def _usual_mode(path: Path) -> None:
    """chmod to what open() would have created under the current umask (e.g. 0644)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
