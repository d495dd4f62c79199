#!/usr/bin/env python3
"""Reference fixtures for hearth-engine, computed with Hugging Face transformers in FP32.

Run from the repository root (the script is never needed by `cargo test`; its outputs are committed):

    scripts/fetch-model
    python3 -m venv /tmp/hearth-ref && /tmp/hearth-ref/bin/pip install -r scripts/reference/requirements.txt
    /tmp/hearth-ref/bin/python scripts/reference/make_fixtures.py

Options: --model PATH (default models/SmolLM2-135M-Instruct.Q4_1.gguf), --out DIR (default
crates/hearth-engine/tests/fixtures), --threads N (torch CPU threads, default 1), --skip-smollm
(only the tiny models, which need no download).

It writes, under --out:

    smollm2_reference.json    SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to FP32): per-position
                              logprobs, top-5 and 32-token greedy continuations for several prompts
    chat_templates.json       the GGUF's chat template, rendered and tokenized for several conversations
    tokenizer_cases.json      ~30 strings encoded/decoded by the tokenizer transformers builds from the GGUF
    tiny_llama/               random 2-layer Llama: config.json, model.safetensors, tokenizer.json,
                              tokenizer_config.json, model.gguf (F32), model-q8_0.gguf, reference.json,
                              reference-q8_0.json
    tiny_qwen2/               the same with Qwen2-style q/k/v biases: config.json, model.safetensors,
                              tokenizer.json, tokenizer_config.json, reference.json

Everything is deterministic: seeded weights, greedy decoding, one CPU thread, sorted-key JSON.
Running it twice gives byte-identical files (on the same machine and library versions).

Conventions shared by every reference file (`prompts[i]`):
    token_ids[k]      the k-th token of the prompt, exactly as `tokenizer(text)["input_ids"]` gives it
    logprobs[j]       log P(token_ids[j+1] | token_ids[0..=j]): log_softmax (float64) of the FP32
                      logits at position j, read at the actual next token; len = len(token_ids) - 1
    top5[j]           the 5 most likely next tokens at position j ({"id", "logprob"}, best first,
                      ties by lower id); len = len(token_ids) - 1
    next_top5         the same at the last prompt position (the first generated token's distribution)
    greedy            argmax decoding from the prompt (KV-cached `generate`, do_sample=False, no
                      repetition penalty, stops after max_new_tokens or when an eos_token_ids token is
                      emitted; that token is then included in token_ids and finish is "eos")
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # numpy's BLAS on one thread too (determinism, shared machine)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = REPO / "crates" / "hearth-engine" / "tests" / "fixtures"

SMOLLM_NEW_TOKENS = 32
TINY_NEW_TOKENS = 16
TOP_K = 5


# ----------------------------------------------------------------------------------------------
# helpers


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    print(f"  wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path} ({path.stat().st_size} bytes)")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    import gguf  # noqa: F401
    import importlib.metadata as md

    return {
        name: md.version(name)
        for name in ["torch", "transformers", "tokenizers", "gguf", "numpy", "safetensors", "accelerate", "jinja2"]
    }


def top_k(logprobs_row: torch.Tensor, k: int = TOP_K) -> list[dict]:
    """The k best entries of a float64 logprob row; ties broken by the lower id."""
    row = logprobs_row.tolist()
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
    return [{"id": i, "logprob": row[i]} for i in order]


def token_ids_of(x) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list or a BatchEncoding depending on version."""
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    if hasattr(x, "tolist"):
        x = x.tolist()
    if x and isinstance(x[0], list):
        assert len(x) == 1
        x = x[0]
    return [int(t) for t in x]


@torch.no_grad()
def score_prompt(model, ids: list[int]) -> dict:
    """Per-position logprobs and top-5 from one full forward pass."""
    out = model(torch.tensor([ids]), use_cache=False)
    logits = out.logits[0]  # [n, vocab] float32
    lp = torch.log_softmax(logits.double(), dim=-1)
    n = len(ids)
    return {
        "logprobs": [lp[j, ids[j + 1]].item() for j in range(n - 1)],
        "top5": [top_k(lp[j]) for j in range(n - 1)],
        "next_top5": top_k(lp[n - 1]),
        "_logits": logits,
        "_lp": lp,
    }


@torch.no_grad()
def greedy(model, tok, ids: list[int], max_new_tokens: int, eos_ids: list[int], pad_id: int) -> dict:
    from transformers import GenerationConfig

    gc = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        bos_token_id=None,
    )
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        generation_config=gc,
        return_dict_in_generate=True,
        output_logits=True,
    )
    new = out.sequences[0, len(ids):].tolist()
    step_lp = [torch.log_softmax(l[0].double(), dim=-1) for l in out.logits]
    assert len(step_lp) == len(new)
    logprobs, margins = [], []
    for t, lp in zip(new, step_lp):
        top2 = torch.topk(lp, 2)
        assert top2.indices[0].item() == t, "generate did not pick the argmax"
        logprobs.append(lp[t].item())
        margins.append((top2.values[0] - top2.values[1]).item())

    # Cross-check the KV-cached steps against one uncached forward pass over prompt + continuation.
    full = model(torch.tensor([ids + new]), use_cache=False).logits[0]
    full_lp = torch.log_softmax(full.double(), dim=-1)
    diffs = [abs(full_lp[len(ids) - 1 + k, t].item() - logprobs[k]) for k, t in enumerate(new)]
    argmax_ok = all(full_lp[len(ids) - 1 + k].argmax().item() == t for k, t in enumerate(new))
    finish = "eos" if new and new[-1] in eos_ids else "length"
    if finish == "length":
        assert len(new) == max_new_tokens
    return {
        "token_ids": new,
        "text": tok.decode(new, skip_special_tokens=False),
        "text_skip_special": tok.decode(new, skip_special_tokens=True),
        "logprobs": logprobs,
        "top1_top2_margin": margins,
        "finish": finish,
        "_max_cache_vs_full_diff": max(diffs) if diffs else 0.0,
        "_full_argmax_ok": argmax_ok,
    }


def reference_prompt(model, tok, name: str, text: str, max_new: int, eos_ids, pad_id, ids=None) -> dict:
    enc_ids = tok(text)["input_ids"] if ids is None else ids
    s = score_prompt(model, enc_ids)
    g = greedy(model, tok, enc_ids, max_new, eos_ids, pad_id)
    for lp in s["logprobs"] + g["logprobs"]:
        assert lp <= 0.0
    # the logprob of a token must equal log_softmax at the previous position
    for j, lp in enumerate(s["logprobs"]):
        assert lp == s["_lp"][j, enc_ids[j + 1]].item()
    print(
        f"    {name}: {len(enc_ids)} tokens, mean logprob "
        f"{(sum(s['logprobs']) / max(1, len(s['logprobs']))):.3f}, greedy {g['finish']} "
        f"({len(g['token_ids'])} tok, cache-vs-full max diff {g['_max_cache_vs_full_diff']:.2e}, "
        f"min margin {min(g['top1_top2_margin']):.2e}): {g['text']!r}"
    )
    assert g["_max_cache_vs_full_diff"] < 1e-3, "KV-cached and full forward disagree"
    assert g["_full_argmax_ok"], "KV-cached greedy differs from the uncached argmax"
    return {
        "name": name,
        "text": text,
        "token_ids": enc_ids,
        "bos_added": bool(tok.bos_token_id is not None and enc_ids and enc_ids[0] == tok.bos_token_id
                          and not text.startswith(tok.bos_token)),
        "logprobs": s["logprobs"],
        "top5": s["top5"],
        "next_top5": s["next_top5"],
        "greedy": {k: v for k, v in g.items() if not k.startswith("_")},
        "_logits": s["_logits"],
    }


def strip_private(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------------
# SmolLM2 (the real model)

SMOLLM_PROMPTS = [
    ("short_english", "The capital of France is"),
    ("single_token", "Hello"),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"),
    (
        "paragraph",
        "The lighthouse stood at the edge of the cliff for more than two hundred years. Every night its "
        "keeper climbed the narrow stairs, trimmed the wick and polished the great lens until it shone. "
        "Ships passing in the dark relied on that steady beam to find their way around the rocks. When the "
        "last keeper retired, the light was automated, but the villagers still say they can see a figure "
        "in the window on stormy nights. Children dare each other to walk up the path after sunset, and",
    ),
    ("digits_punct", "In 2024, 3.14159 * 2 = ?"),
    ("non_ascii", "Ça va? 日本語とEmoji 🎉"),
    ("whitespace_digits", "Total:  12  items\tat\t$3.50\n\nAnswer:"),
]

SMOLLM_CHAT_PROMPTS = [
    ("chat_capital", [{"role": "user", "content": "What is the capital of France?"}]),
    (
        "chat_system_haiku",
        [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Write a haiku about the sea."},
        ],
    ),
]


def gguf_metadata(path: Path) -> dict:
    """All scalar/string metadata of a GGUF file (arrays summarised by their length)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in r.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > 16:
            meta[key] = {"array_len": len(field.data)}
        else:
            v = field.contents()
            if isinstance(v, float):
                v = float(np.float32(v))
            meta[key] = v
    return meta


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (HF rotate-half rows -> llama.cpp interleaved rows)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """The inverse of llama_cpp_permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
HF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str:
    if gguf_name in HF_NAMES:
        return HF_NAMES[gguf_name]
    _, n, rest = gguf_name.split(".", 2)
    return f"model.layers.{n}.{HF_BLOCK_NAMES[rest]}"


def check_weights_against_own_dequant(model, path: Path, n_head: int, n_kv: int) -> dict:
    """Dequantize the GGUF ourselves (gguf.quants), un-permute Q/K, compare with transformers' weights."""
    import gguf

    r = gguf.GGUFReader(str(path))
    sd = model.state_dict()
    worst = 0.0
    types = {}
    for t in r.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape.tolist())])  # ggml ne is reversed numpy order
        if ".attn_q." in t.name:
            w = llama_cpp_unpermute(w, n_head, n_head)
        elif ".attn_k." in t.name:
            w = llama_cpp_unpermute(w, n_head, n_kv)
        ref = sd[hf_name(t.name)].numpy()
        assert ref.shape == w.shape, (t.name, ref.shape, w.shape)
        worst = max(worst, float(np.abs(ref - w).max()))
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    # roundtrip of the permutation itself
    x = np.arange(192 * 4, dtype=np.float32).reshape(192, 4)
    assert np.array_equal(llama_cpp_permute(llama_cpp_unpermute(x, 9, 3), 9, 3), x)
    tied = "output.weight" not in {t.name for t in r.tensors}
    if tied:
        assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    return {"max_abs_diff": worst, "tensor_types": types, "output_tied_to_token_embd": tied}


@torch.no_grad()
def hidden_state_trace(model, ids: list[int]) -> list[dict]:
    """RMS and first 8 values of the last position's hidden state after the embedding, each layer,
    and the final norm (a debugging aid for layer-by-layer comparison)."""
    trace = []

    def hook(name):
        def f(_m, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            v = h[0, -1].double()
            trace.append({"after": name, "rms": v.pow(2).mean().sqrt().item(), "first8": v[:8].tolist()})

        return f

    hs = [model.model.embed_tokens.register_forward_hook(hook("embed_tokens"))]
    for i, layer in enumerate(model.model.layers):
        hs.append(layer.register_forward_hook(hook(f"layer.{i}")))
    hs.append(model.model.norm.register_forward_hook(hook("final_norm")))
    try:
        model(torch.tensor([ids]), use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return trace


def smollm(model_path: Path, out_dir: Path, vers: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"SmolLM2: loading {model_path}")
    d, name = str(model_path.parent), model_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    cfg = model.config
    meta = gguf_metadata(model_path)

    wcheck = check_weights_against_own_dequant(model, model_path, cfg.num_attention_heads, cfg.num_key_value_heads)
    print(f"  own dequant + un-permute vs transformers: max abs diff {wcheck['max_abs_diff']:.3g}")
    assert wcheck["max_abs_diff"] == 0.0

    eos_ids = [tok.eos_token_id]
    pad_id = tok.pad_token_id
    rope = getattr(cfg, "rope_parameters", None) or {}
    config = {
        "architecture": "LlamaForCausalLM",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": float(rope.get("rope_theta", getattr(cfg, "rope_theta", 0.0))),
        "rope_type": rope.get("rope_type", "default"),
        "rms_norm_eps": float(cfg.rms_norm_eps),
        "hidden_act": cfg.hidden_act,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "attention_bias": bool(cfg.attention_bias),
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
        "attn_implementation": "eager",
    }

    print("  prompts:")
    prompts = []
    for pname, text in SMOLLM_PROMPTS:
        prompts.append(reference_prompt(model, tok, pname, text, SMOLLM_NEW_TOKENS, eos_ids, pad_id))
    digit_split = smollm_digit_split_tokenizer(tok)
    for pname, messages in SMOLLM_CHAT_PROMPTS:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = token_ids_of(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
        assert ids == tok(text)["input_ids"]
        p = reference_prompt(model, tok, pname, text, SMOLLM_NEW_TOKENS, eos_ids, pad_id, ids=ids)
        p["messages"] = messages
        prompts.append(p)
    for p in prompts:
        ds = digit_split.encode(p["text"], add_special_tokens=False).ids
        p["token_ids_digit_split_pretokenizer"] = ds
        p["digit_split_differs"] = ds != p["token_ids"]

    # independent float64 numpy forward pass on the GGUF as stored (llama.cpp RoPE convention)
    np_check = [p for p in prompts if p["name"] in ("short_english", "chat_capital")]
    npdiff = check_numpy_gguf_forward(model_path, np_check)
    print(f"  independent numpy float64 forward on the GGUF vs reference: max abs logprob diff {npdiff:.3g}")
    assert npdiff < 1e-3
    wcheck["numpy_float64_forward_max_abs_logprob_diff"] = npdiff
    wcheck["numpy_float64_forward_prompts"] = [p["name"] for p in np_check]

    trace = hidden_state_trace(model, prompts[0]["token_ids"])
    # last-position logits of the first prompt, raw FP32 (first 16 ids) - handy for a first smoke test
    first_logits = prompts[0]["_logits"][-1]

    write_json(
        out_dir / "smollm2_reference.json",
        {
            "description": (
                "SmolLM2-135M-Instruct, the Q4_1 GGUF dequantized to FP32 by transformers "
                "(from_pretrained(gguf_file=...)), eager attention, CPU, float64 log_softmax of FP32 logits. "
                "prompts[i].logprobs[j] = log P(token_ids[j+1] | token_ids[0..=j]); top5[j] is the distribution "
                "at the same position; next_top5 is the distribution after the last prompt token; greedy is "
                "argmax decoding (KV cache) of up to max_new_tokens, stopping when a token in eos_token_ids is "
                "emitted (kept in greedy.token_ids, finish='eos'), else finish='length'. "
                "greedy.logprobs[k] = log P(greedy.token_ids[k] | prompt + greedy.token_ids[..k]). "
                "Chat prompts (those with 'messages') are the chat template rendered with add_generation_prompt. "
                "token_ids_digit_split_pretokenizer: the same text under llama.cpp's 'smollm' pre-tokenizer "
                "(digits split first; see tokenizer_cases.json pre_tokenizer_note) - the logprobs are for token_ids."
            ),
            "model_file": {"name": model_path.name, "sha256": sha256(model_path), "bytes": model_path.stat().st_size},
            "gguf_metadata": meta,
            "config": config,
            "tokenizer_adds_bos": bool(tok(" x")["input_ids"][0] == tok.bos_token_id),
            "bos_token_id": tok.bos_token_id,
            "eos_token_ids": eos_ids,
            "max_new_tokens": SMOLLM_NEW_TOKENS,
            "weights_check": {
                "description": (
                    "every GGUF tensor dequantized with gguf.quants.dequantize, attn_q/attn_k rows un-permuted "
                    "(inverse of convert_hf_to_gguf.py's permute), compared with the model transformers loaded; "
                    "and an independent float64 numpy forward pass on the GGUF tensors as stored (permuted Q/K, "
                    "RoPE on adjacent pairs as llama.cpp does) compared with the reference logprobs"
                ),
                **wcheck,
            },
            "prompts": [strip_private(p) for p in prompts],
            "debug": {
                "hidden_state_trace": {
                    "description": (
                        "prompt 0, last position: rms and first 8 values of the residual stream after the "
                        "token embedding, after each decoder layer, and after the final RMSNorm"
                    ),
                    "prompt": prompts[0]["name"],
                    "trace": trace,
                },
                "last_logits_first16": {
                    "description": "prompt 0: raw FP32 logits at the last position for token ids 0..16",
                    "prompt": prompts[0]["name"],
                    "values": first_logits[:16].double().tolist(),
                    "argmax": int(first_logits.argmax().item()),
                },
            },
            "generator": {"script": "scripts/reference/make_fixtures.py", "versions": vers},
        },
    )

    chat_templates(tok, meta, out_dir, model_path, vers)
    tokenizer_cases(tok, out_dir, model_path, vers)


# ----------------------------------------------------------------------------------------------
# chat templates

CONVERSATIONS = [
    ("single_user", [{"role": "user", "content": "Hello!"}], True),
    (
        "system_user",
        [
            {"role": "system", "content": "You are a pirate. Answer in pirate speak."},
            {"role": "user", "content": "Where is the treasure?"},
        ],
        True,
    ),
    (
        "multi_turn_with_system",
        [
            {"role": "system", "content": "You are a math tutor."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "2 + 2 = 4."},
            {"role": "user", "content": "And 3 * 7?"},
        ],
        True,
    ),
    (
        "multi_turn_default_system",
        [
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"},
        ],
        True,
    ),
    (
        "assistant_newlines_unicode",
        [
            {"role": "user", "content": "Show me some code and a café."},
            {
                "role": "assistant",
                "content": "Sure!\n\n```python\nprint(\"héllo, 世界\")\n```\n\n• café ☕ — naïve résumé 🎉\n",
            },
            {"role": "user", "content": "Thanks  \t(with tabs and  spaces)"},
        ],
        True,
    ),
    (
        "no_generation_prompt",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "Hi."},
        ],
        False,
    ),
    ("empty_user_content", [{"role": "user", "content": ""}], True),
    (
        "system_not_first",
        [
            {"role": "user", "content": "First."},
            {"role": "system", "content": "Late system message."},
        ],
        True,
    ),
    (
        "content_with_special_token_text",
        [{"role": "user", "content": "What does <|im_end|> mean?"}],
        True,
    ),
]


def special_tokens(tok) -> dict:
    out = {}
    for k in ["bos", "eos", "pad", "unk"]:
        s = getattr(tok, f"{k}_token")
        out[k] = {"token": s, "id": getattr(tok, f"{k}_token_id")}
    out["all_special"] = [
        {"token": t, "id": i} for t, i in sorted(zip(tok.all_special_tokens, tok.all_special_ids), key=lambda x: x[1])
    ]
    added = tok.get_added_vocab() if hasattr(tok, "get_added_vocab") else {}
    out["added_tokens"] = [{"token": t, "id": i} for t, i in sorted(added.items(), key=lambda x: x[1])]
    return out


def chat_templates(tok, meta: dict, out_dir: Path, model_path: Path, vers: dict) -> None:
    template = meta["tokenizer.chat_template"]
    assert tok.chat_template == template
    convs = []
    for name, messages, gen in CONVERSATIONS:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        ids = token_ids_of(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen))
        assert ids == tok(text, add_special_tokens=False)["input_ids"], name
        assert tok.decode(ids) == text, name
        convs.append(
            {
                "name": name,
                "messages": messages,
                "add_generation_prompt": gen,
                "text": text,
                "token_ids": ids,
                "default_system_inserted": messages[0]["role"] != "system" and "You are a helpful AI assistant named SmolLM" in text,
            }
        )
    write_json(
        out_dir / "chat_templates.json",
        {
            "description": (
                "tokenizer.chat_template of the SmolLM2 GGUF rendered by transformers' apply_chat_template "
                "(jinja2). conversations[i].text = apply_chat_template(messages, tokenize=False, "
                "add_generation_prompt=...); token_ids = apply_chat_template(..., tokenize=True), which equals "
                "tokenizer(text, add_special_tokens=False) (special-token strings in the text become their ids; "
                "no BOS is prepended)."
            ),
            "model_file": model_path.name,
            "chat_template": template,
            "special_tokens": special_tokens(tok),
            "conversations": convs,
            "generator": {"script": "scripts/reference/make_fixtures.py", "versions": vers},
        },
    )


# ----------------------------------------------------------------------------------------------
# tokenizer cases

TOKENIZER_CASES = [
    ("empty", ""),
    ("single_space", " "),
    ("hello_world", "Hello world"),
    ("leading_space", " Hello"),
    ("leading_spaces", "   leading spaces"),
    ("trailing_spaces", "trailing spaces   "),
    ("whitespace_run", "a    b     c"),
    ("newlines", "line one\nline two\n\nline four\n"),
    ("crlf", "windows\r\nline\r\n"),
    ("tabs", "col1\tcol2\t\tcol4"),
    ("mixed_ws_before_digits", "x  12\n\n 3\t45"),
    ("digits", "0123456789"),
    ("long_number", "The answer is 340282366920938463463374607431768211455."),
    ("decimal_math", "In 2024, 3.14159 * 2 = ?"),
    ("url", "https://example.com/path/to/page?query=1&lang=en#frag"),
    ("email", "contact: jane.doe+test@example.org"),
    ("code_python", "def add(a, b):\n    return a + b  # sum\n"),
    ("code_rust", "fn main() {\n    let v: Vec<u8> = vec![1, 2, 3];\n    println!(\"{:?}\", v);\n}"),
    ("json", '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}'),
    ("contractions", "I'm sure you'll see they've done it, isn't it? I'D SAY"),
    ("punctuation", "Wait... what?! (yes) [no] {maybe} -- ok; fine: \"quoted\" 'single'"),
    ("cjk", "日本語のテキストと中文文本"),
    ("korean", "안녕하세요 세계"),
    ("emoji", "🎉🔥👍🏽 family: 👨‍👩‍👧"),
    ("combining", "e\u0301 vs \u00e9, n\u0303, Zalgo: Z\u0351\u0357a\u0352l\u0334g\u0315o"),
    ("accents", "Ça va? Crème brûlée à la française, naïve façade"),
    ("mixed_scripts", "Ça va? 日本語とEmoji 🎉"),
    ("arabic_rtl", "مرحبا بالعالم"),
    ("cyrillic", "Привет, мир!"),
    ("special_im_start", "<|im_start|>"),
    ("special_in_text", "<|im_start|>user\nHi<|im_end|>\n"),
    ("special_endoftext", "before<|endoftext|>after"),
    ("special_like_not_special", "<|im_star|> <im_start> < |im_end| >"),
    ("repo_special", "<repo_name>hearth<file_sep>"),
    ("null_and_control", "a\u0000b\u0007c\u001bd"),
    ("bom_and_zero_width", "\ufeffstart\u200bzero\u200dwidth"),
]


def smollm_digit_split_tokenizer(tok):
    """The pre-tokenizer SmolLM2's original tokenizer.json (and llama.cpp's 'smollm' pre type) uses:
    every digit split off first, then the GPT-2 byte-level regex. transformers' GGUF loader has no
    entry for pre='smollm' and falls back to plain ByteLevel (GPT-2 regex only)."""
    from tokenizers import Tokenizer, pre_tokenizers

    bt = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    bt.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return bt


def tokenizer_cases(tok, out_dir: Path, model_path: Path, vers: dict) -> None:
    digit_split = smollm_digit_split_tokenizer(tok)
    cases = []
    n_diff = 0
    for name, text in TOKENIZER_CASES:
        no_special = tok(text, add_special_tokens=False)["input_ids"]
        with_special = tok(text, add_special_tokens=True)["input_ids"]
        split_special = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        decoded = tok.decode(no_special, skip_special_tokens=False)
        decoded_skip = tok.decode(no_special, skip_special_tokens=True)
        ds = digit_split.encode(text, add_special_tokens=False).ids
        if ds != no_special:
            n_diff += 1
        cases.append(
            {
                "name": name,
                "text": text,
                "ids": no_special,
                "ids_with_special_tokens": with_special,
                "ids_split_special_tokens": split_special,
                "tokens": tok.convert_ids_to_tokens(no_special),
                "decoded": decoded,
                "decoded_skip_special": decoded_skip,
                "roundtrip_exact": decoded == text,
                "ids_digit_split_pretokenizer": ds,
                "digit_split_differs": ds != no_special,
            }
        )
        for ids in (no_special, split_special):
            assert tok.decode(ids) == text, (name, tok.decode(ids), text)
    print(f"  tokenizer cases: {len(cases)}, digit-split pre-tokenizer differs on {n_diff}")
    write_json(
        out_dir / "tokenizer_cases.json",
        {
            "description": (
                "The tokenizer transformers builds from the SmolLM2 GGUF (AutoTokenizer.from_pretrained(dir, "
                "gguf_file=...)): byte-level BPE, vocab from tokenizer.ggml.tokens, merges from "
                "tokenizer.ggml.merges, control tokens (token_type 3) as special added tokens. "
                "ids = tokenizer(text, add_special_tokens=False); ids_with_special_tokens = the same with "
                "add_special_tokens=True (identical here: the GGUF says add_bos_token=false and nothing is "
                "appended); in both, special-token strings in the text ARE matched and become their ids. "
                "ids_split_special_tokens = split_special_tokens=True (special-token strings tokenized as plain "
                "text, like llama.cpp with parse_special=false). tokens = the byte-level token strings. "
                "decoded = decode(ids); decoded_skip_special = decode(ids, skip_special_tokens=True). "
                "ids_digit_split_pretokenizer = the same vocab/merges with the pre-tokenizer of SmolLM2's "
                "original tokenizer.json and llama.cpp's 'smollm' pre type (Digits(individual_digits=True) "
                "then the GPT-2 ByteLevel regex); transformers' GGUF loader does not apply the digit split "
                "(see pre_tokenizer_note)."
            ),
            "model_file": model_path.name,
            "pre_tokenizer_transformers": json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"],
            "pre_tokenizer_note": (
                "GGUF tokenizer.ggml.pre = 'smollm'. llama.cpp splits with '\\p{N}' (each digit alone) and then "
                "the GPT-2 regex \"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)\", "
                "as SmolLM2's own tokenizer.json does (Digits + ByteLevel). transformers builds ByteLevel only. "
                "The vocab has no multi-digit or space+digit tokens, so the two agree except where a whitespace "
                "run precedes a digit: GPT-2 regex alone gives ' '+' 12' -> [Ġ, Ġ, 1, 2]; digit split first "
                "gives '  '+'1'+'2' -> [ĠĠ, 1, 2]."
            ),
            "add_bos_token": False,
            "vocab_size": len(tok),
            "special_tokens": special_tokens(tok),
            "cases": cases,
            "generator": {"script": "scripts/reference/make_fixtures.py", "versions": vers},
        },
    )


# ----------------------------------------------------------------------------------------------
# tiny random models

TINY_CORPUS = """\
The small lamp on the desk was still burning when the rain began. Outside, the street was quiet,
and the only sound was the water running down the windows. She opened the notebook, read the last
line again, and started to write. Every story begins with a question, and this one began with a
simple question: what would you do if the lights went out for a whole week?

People talk about the weather because it is the one thing everyone shares. In the morning the sky
was clear and blue; by the afternoon the clouds had rolled in from the sea. The fishermen brought
their boats back early, and the children ran home from school with their coats over their heads.

Hello world! How are you today? I am fine, thank you. The quick brown fox jumps over the lazy dog.
We will meet at 10:30 on the 2nd of May, 2024, at 42 Main Street. The price is $3.50 or 3,50 EUR.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 3.14159 2.71828 -1 +1 1e-5 0x1F.

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))

fn main() { let x: u32 = 7; println!("{}", x * 6); }

<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
What is the capital of France?<|im_end|>
<|im_start|>assistant
The capital of France is Paris.<|im_end|>

Ça va? Très bien, merci. Die Straße ist nass. 日本語 テキスト 中文 한국어 🎉 👍
"""

TINY_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_VOCAB = 512


QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tiny_tokenizer(kind: str):
    """A 512-token byte-level BPE trained on TINY_CORPUS.

    llama: GPT-2 style (ByteLevel pre-tokenizer with its built-in regex, no normalizer), like
    tokenizer.ggml.pre = 'gpt-2'. qwen2: what Qwen2's tokenizer.json has (NFC normalizer, Split on
    the Qwen2 regex, then ByteLevel without regex); transformers' Qwen2Tokenizer forces exactly this
    on any model_type=qwen2 checkpoint regardless of its tokenizer.json, so the file must agree.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    if kind == "llama":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        min_frequency=1,
        special_tokens=TINY_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # several copies of the corpus in a fixed order, so pair counts are not all ties
    lines = TINY_CORPUS.splitlines(keepends=True)
    tk.train_from_iterator(lines * 3, trainer=trainer)
    assert tk.get_vocab_size() == TINY_VOCAB, tk.get_vocab_size()
    for i, s in enumerate(TINY_SPECIAL):
        assert tk.token_to_id(s) == i
    return tk


def tiny_config(kind: str) -> dict:
    common = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": TINY_VOCAB,
        "max_position_embeddings": 256,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if kind == "llama":
        return {
            "bos_token_id": 1,
            "pad_token_id": 2,
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            **common,
        }
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "bos_token_id": 0,
        "model_type": "qwen2",
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 2,
        "attention_dropout": 0.0,
        **common,
    }


def tiny_weights(cfg: dict, seed: int, biases: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q_out, kv_out = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def normal(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * std).contiguous()

    def norm_w(n):
        return (1.0 + normal(n, std=0.1)).contiguous()

    sd = {"model.embed_tokens.weight": normal(v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm_w(h)
        sd[p + "self_attn.q_proj.weight"] = normal(q_out, h)
        sd[p + "self_attn.k_proj.weight"] = normal(kv_out, h)
        sd[p + "self_attn.v_proj.weight"] = normal(kv_out, h)
        if biases:
            sd[p + "self_attn.q_proj.bias"] = normal(q_out, std=0.1)
            sd[p + "self_attn.k_proj.bias"] = normal(kv_out, std=0.1)
            sd[p + "self_attn.v_proj.bias"] = normal(kv_out, std=0.1)
        sd[p + "self_attn.o_proj.weight"] = normal(h, q_out)
        sd[p + "post_attention_layernorm.weight"] = norm_w(h)
        sd[p + "mlp.gate_proj.weight"] = normal(inter, h)
        sd[p + "mlp.up_proj.weight"] = normal(inter, h)
        sd[p + "mlp.down_proj.weight"] = normal(h, inter)
    sd["model.norm.weight"] = norm_w(h)
    sd["lm_head.weight"] = normal(v, h)
    return sd


TINY_TOKENIZER_CONFIG = {
    "llama": {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
    },
    "qwen2": {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
    },
}


def write_tiny_checkpoint(d: Path, kind: str, cfg: dict, sd: dict, tk) -> None:
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "config.json", cfg)
    save_file(dict(sorted(sd.items())), str(d / "model.safetensors"), metadata={"format": "pt"})
    print(f"  wrote {(d / 'model.safetensors').relative_to(REPO)} ({(d / 'model.safetensors').stat().st_size} bytes)")
    tok_json = json.loads(tk.to_str())
    write_json(d / "tokenizer.json", tok_json)
    write_json(
        d / "tokenizer_config.json",
        {
            **TINY_TOKENIZER_CONFIG[kind],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": cfg["max_position_embeddings"],
            "chat_template": TINY_CHAT_TEMPLATE,
        },
    )


def load_tiny(d: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(
        str(d), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, bad
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(d))
    return model, tok


def check_tokenizer_json_agrees(d: Path, tok) -> None:
    """The plain `tokenizers` library on tokenizer.json must give what AutoTokenizer gives."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    for _, text in TOKENIZER_CASES + TINY_PROMPTS:
        a = tok(text, add_special_tokens=False)["input_ids"]
        assert raw.encode(text, add_special_tokens=False).ids == a, (d.name, text)
        assert raw.decode(a, skip_special_tokens=False) == tok.decode(a), (d.name, text)


TINY_PROMPTS = [
    ("hello", "Hello world"),
    ("sentence", "The quick brown fox jumps over the lazy dog."),
    ("digits_code", "for i in range(10):\n    print(i * 3.5)"),
]
TINY_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def tiny_reference(model, tok, cfg: dict, title: str) -> tuple[dict, list]:
    eos_ids, pad_id = [cfg["eos_token_id"]], cfg.get("pad_token_id", cfg["eos_token_id"])
    prompts = []
    for name, text in TINY_PROMPTS:
        prompts.append(reference_prompt(model, tok, name, text, TINY_NEW_TOKENS, eos_ids, pad_id))
    text = tok.apply_chat_template(TINY_CHAT, tokenize=False, add_generation_prompt=True)
    ids = token_ids_of(tok.apply_chat_template(TINY_CHAT, tokenize=True, add_generation_prompt=True))
    assert ids == tok(text)["input_ids"]
    p = reference_prompt(model, tok, "chat", text, TINY_NEW_TOKENS, eos_ids, pad_id, ids=ids)
    p["messages"] = TINY_CHAT
    prompts.append(p)
    out = []
    for p in prompts:
        q = strip_private(p)
        q["last_logits"] = p["_logits"][-1].double().tolist()  # raw FP32 logits, all 512 ids
        out.append(q)
    return {
        "description": (
            f"{title}, computed by transformers in FP32 (eager attention, CPU). prompts[i].logprobs[j] = "
            "log P(token_ids[j+1] | token_ids[0..=j]) (float64 log_softmax of the FP32 logits); top5[j] the 5 "
            "best at that position; next_top5 the distribution after the last prompt token; last_logits the raw "
            "FP32 logits at the last prompt position for every vocab id; greedy = argmax decoding with KV cache "
            "of up to max_new_tokens, stopping at an eos_token_ids token (kept, finish='eos'). greedy.logprobs[k] "
            "= log P(greedy.token_ids[k] | prompt + greedy.token_ids[..k]); top1_top2_margin shows how robust "
            "each argmax is."
        ),
        "config": cfg,
        "eos_token_ids": eos_ids,
        "max_new_tokens": TINY_NEW_TOKENS,
        "tokenizer_adds_bos": False,
        "tokenizer_pre_tokenizer": json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"],
        "tokenizer_normalizer": json.loads(tok.backend_tokenizer.to_str())["normalizer"],
        "prompts": out,
    }, prompts


def gguf_tokenizer_fields(tk) -> tuple[list[str], list[int], list[str]]:
    vocab = tk.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for s, i in vocab.items():
        tokens[i] = s
    assert all(t is not None for t in tokens)
    types = [3 if t in TINY_SPECIAL else 1 for t in tokens]  # 3 = CONTROL, 1 = NORMAL
    merges = json.loads(tk.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, types, merges


def llama3_rope_factors(cfg: dict) -> np.ndarray:
    """The per-frequency divisors llama.cpp's convert_hf_to_gguf.py stores as rope_freqs.weight for a
    config with Llama 3 rope scaling (written out here from that recipe, not from hearth's code)."""
    rs = cfg["rope_scaling"]
    d = cfg["head_dim"]
    freqs = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_tiny_gguf(path: Path, cfg: dict, sd: dict, tk, qtype=None) -> None:
    import gguf

    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("hearth tiny llama (random weights)")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype is None else gguf.LlamaFileType.MOSTLY_Q8_0)
    if qtype is not None:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = gguf_tokenizer_fields(tk)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])  # 1 = <|im_start|>, as in the SmolLM2 GGUF
    w.add_eos_token_id(cfg["eos_token_id"])  # 2 = <|im_end|>
    w.add_unk_token_id(0)  # <|endoftext|>
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(TINY_CHAT_TEMPLATE)

    def put(name: str, t: torch.Tensor, permute=None):
        a = t.numpy().astype(np.float32)
        if permute is not None:
            a = llama_cpp_permute(a, *permute)
        a = np.ascontiguousarray(a)
        if qtype is not None and a.ndim == 2:
            q = gguf.quants.quantize(a, qtype)
            w.add_tensor(name, q, raw_dtype=qtype)
        else:
            w.add_tensor(name, a)

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", sd[p + "self_attn.q_proj.weight"], permute=(n_head, n_head))
        put(f"blk.{i}.attn_k.weight", sd[p + "self_attn.k_proj.weight"], permute=(n_head, n_kv))
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    put("output.weight", sd["lm_head.weight"])
    if cfg.get("rope_scaling", {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"  wrote {path.relative_to(REPO)} ({path.stat().st_size} bytes)")


@torch.no_grad()
def compare_gguf_model(d: Path, gguf_name: str, ref_model, ref_tok, prompts) -> float:
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Load from a directory holding only the GGUF: next to config.json / tokenizer.json, transformers
    # would take (part of) the config and tokenizer from those instead of the GGUF metadata.
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(d / gguf_name, tmp)
        gm = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name, dtype=torch.float32, attn_implementation="eager")
        gt = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
    gm.eval()
    assert gm.config.num_key_value_heads == ref_model.config.num_key_value_heads
    assert gm.config.rms_norm_eps == ref_model.config.rms_norm_eps or abs(gm.config.rms_norm_eps - ref_model.config.rms_norm_eps) < 1e-12
    assert not gm.config.tie_word_embeddings
    worst = 0.0
    for p in prompts:
        assert gt(p["text"])["input_ids"] == ref_tok(p["text"])["input_ids"], "GGUF tokenizer disagrees"
        ids = torch.tensor([p["token_ids"]])
        worst = max(worst, (gm(ids).logits - ref_model(ids).logits).abs().max().item())
    for name, text in TOKENIZER_CASES:
        assert gt(text)["input_ids"] == ref_tok(text)["input_ids"], ("GGUF tokenizer disagrees", name)
    assert gt.chat_template == ref_tok.chat_template
    return worst


def dequantized_state_dict(path: Path, cfg: dict) -> dict[str, torch.Tensor]:
    """A GGUF file back to an HF state dict (dequantized, Q/K un-permuted)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    sd = {}
    for t in r.tensors:
        if t.name == "rope_freqs.weight":  # RoPE scaling, not a weight of the HF model
            continue
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        a = a.reshape([int(x) for x in reversed(t.shape.tolist())])
        if ".attn_q." in t.name:
            a = llama_cpp_unpermute(a, cfg["num_attention_heads"], cfg["num_attention_heads"])
        elif ".attn_k." in t.name:
            a = llama_cpp_unpermute(a, cfg["num_attention_heads"], cfg["num_key_value_heads"])
        sd[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(a))
    return sd


@torch.no_grad()
def sensitivity(d: Path, model, sd: dict, prompts: list, kind: str) -> dict:
    """How far some classic implementation mistakes move the logprobs (max over all prompts and
    positions): a test tolerance well below these numbers catches them."""
    from transformers import AutoModelForCausalLM

    def lp(m, ids, **kw):
        return m(torch.tensor([ids]), use_cache=False, **kw).logits[0].double().log_softmax(-1)

    def variant(change):
        m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()
        sd2 = {k: v.clone() for k, v in sd.items()}
        change(sd2)
        m.load_state_dict(sd2)
        return m

    cfg = model.config
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads

    def interleave(sd2):
        for i in range(cfg.num_hidden_layers):
            for n, kvh in (("q", nh), ("k", nkv)):
                k = f"model.layers.{i}.self_attn.{n}_proj.weight"
                sd2[k] = torch.from_numpy(llama_cpp_permute(sd2[k].numpy(), nh, kvh))
                if kind == "qwen2":
                    b = f"model.layers.{i}.self_attn.{n}_proj.bias"
                    sd2[b] = torch.from_numpy(llama_cpp_permute(sd2[b].numpy(), nh, kvh))

    def no_bias(sd2):
        for k in sd2:
            if k.endswith(".bias"):
                sd2[k] = torch.zeros_like(sd2[k])

    checks = {
        "no_rope": lambda ids: lp(model, ids, position_ids=torch.zeros(1, len(ids), dtype=torch.long)),
        "rope_positions_off_by_one": lambda ids: lp(model, ids, position_ids=torch.arange(1, len(ids) + 1)[None]),
    }
    m_inter = variant(interleave)
    checks["rope_pairs_interleaved_instead_of_halves"] = lambda ids: lp(m_inter, ids)
    if kind == "qwen2":
        m_nb = variant(no_bias)
        checks["qkv_bias_ignored"] = lambda ids: lp(m_nb, ids)
    out = {}
    for name, f in checks.items():
        worst = 0.0
        for p in prompts:
            worst = max(worst, (f(p["token_ids"]) - lp(model, p["token_ids"])).abs().max().item())
        out[f"max_abs_logprob_change_{name}"] = worst
    return out


def numpy_llama_logprobs_from_gguf(path: Path, ids: list[int]) -> np.ndarray:
    """An independent float64 Llama forward pass straight from a GGUF file, the way llama.cpp runs it:
    weights as stored (attn_q/attn_k rows permuted), RoPE rotating ADJACENT pairs (x[2i], x[2i+1])
    of each head with frequency theta^(-2i/head_dim) (llama.cpp's "normal" rope mode). On HF weights
    the same result needs rotate-half RoPE (pairs (x[i], x[i + head_dim/2])). Returns [n, vocab] logprobs."""
    import gguf

    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    W = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        W[t.name] = a.reshape([int(x) for x in reversed(t.shape.tolist())])
    n_layer, n_head, n_kv = f["llama.block_count"], f["llama.attention.head_count"], f["llama.attention.head_count_kv"]
    eps, theta = f["llama.attention.layer_norm_rms_epsilon"], f["llama.rope.freq_base"]
    d = f["llama.embedding_length"] // n_head
    n = len(ids)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
    if "rope_freqs.weight" in W:  # llama.cpp divides each frequency by its factor
        inv = inv / W["rope_freqs.weight"].reshape(-1)
    ang = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]  # [n, d/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(x):  # x [n, heads, d], adjacent pairs
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    h = W["token_embd.weight"][ids]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(n_layer):
        b = f"blk.{i}."
        x = rms(h, W[b + "attn_norm.weight"])
        q = rope((x @ W[b + "attn_q.weight"].T).reshape(n, n_head, d))
        k = rope((x @ W[b + "attn_k.weight"].T).reshape(n, n_kv, d))
        v = (x @ W[b + "attn_v.weight"].T).reshape(n, n_kv, d)
        rep_ = n_head // n_kv
        k, v = np.repeat(k, rep_, axis=1), np.repeat(v, rep_, axis=1)  # head j uses kv head j // rep_
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", att, v).reshape(n, n_head * d)
        h = h + o @ W[b + "attn_output.weight"].T
        x = rms(h, W[b + "ffn_norm.weight"])
        g = x @ W[b + "ffn_gate.weight"].T
        h = h + ((g / (1 + np.exp(-g))) * (x @ W[b + "ffn_up.weight"].T)) @ W[b + "ffn_down.weight"].T
    logits = rms(h, W["output_norm.weight"]) @ W.get("output.weight", W["token_embd.weight"]).T
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def check_numpy_gguf_forward(path: Path, prompts: list) -> float:
    worst = 0.0
    for p in prompts:
        ids = p["token_ids"] + p["greedy"]["token_ids"]
        lp = numpy_llama_logprobs_from_gguf(path, ids)
        for j in range(len(p["token_ids"]) - 1):
            worst = max(worst, abs(lp[j, ids[j + 1]] - p["logprobs"][j]))
        for k, t in enumerate(p["greedy"]["token_ids"]):
            worst = max(worst, abs(lp[len(p["token_ids"]) - 1 + k, t] - p["greedy"]["logprobs"][k]))
    return worst


def tiny(out_dir: Path, vers: dict) -> None:
    import gguf

    for kind, seed, title in [("llama", 1234, "tiny random Llama"), ("qwen2", 5678, "tiny random Qwen2 (q/k/v biases)")]:
        print(f"{title}: training the 512-token byte-level BPE")
        tk = train_tiny_tokenizer(kind)
        assert tk.to_str() == train_tiny_tokenizer(kind).to_str(), "tokenizer training is not deterministic"
        d = out_dir / f"tiny_{kind}"
        cfg = tiny_config(kind)
        sd = tiny_weights(cfg, seed, biases=(kind == "qwen2"))
        print(f"  {sum(t.numel() for t in sd.values())} parameters")
        write_tiny_checkpoint(d, kind, cfg, sd, tk)
        model, tok = load_tiny(d)
        check_tokenizer_json_agrees(d, tok)
        rope = getattr(model.config, "rope_parameters", None) or {}
        assert float(rope.get("rope_theta", getattr(model.config, "rope_theta", -1))) == cfg["rope_theta"]
        for k, v in model.state_dict().items():
            assert torch.equal(v, sd[k]), k
        ref, prompts = tiny_reference(model, tok, cfg, title)
        ref["files"] = {"weights": "model.safetensors", "tokenizer": "tokenizer.json", "config": "config.json"}
        ref["weights"] = {"seed": seed, "std": 0.02, "norm_weights": "1 + N(0, 0.1)",
                          "biases": "N(0, 0.1)" if kind == "qwen2" else None}
        ref["generator"] = {"script": "scripts/reference/make_fixtures.py", "versions": vers}
        ref["sensitivity"] = sensitivity(d, model, sd, prompts, kind)
        print(f"  sensitivity: {ref['sensitivity']}")

        if kind == "llama":
            write_tiny_gguf(d / "model.gguf", cfg, sd, tk)
            diff = compare_gguf_model(d, "model.gguf", model, tok, prompts)
            print(f"  model.gguf via transformers vs safetensors: max abs logit diff {diff:.3g}")
            assert diff < 1e-5
            # our own reader agrees exactly with the safetensors weights
            back = dequantized_state_dict(d / "model.gguf", cfg)
            assert all(torch.equal(back[k], sd[k]) for k in sd)
            npdiff = check_numpy_gguf_forward(d / "model.gguf", prompts)
            print(f"  independent numpy forward on model.gguf (adjacent-pair RoPE) vs reference: max abs logprob diff {npdiff:.3g}")
            assert npdiff < 1e-5
            ref["gguf"] = {"file": "model.gguf", "max_abs_logit_diff_vs_safetensors": diff, "type": "F32"}

            if hasattr(gguf, "quants") and hasattr(gguf.quants, "quantize"):
                write_tiny_gguf(d / "model-q8_0.gguf", cfg, sd, tk, qtype=gguf.GGMLQuantizationType.Q8_0)
                # reference for the Q8_0 file: the same model with every 2-D weight quantized+dequantized
                qsd = dequantized_state_dict(d / "model-q8_0.gguf", cfg)
                qmodel, _ = load_tiny(d)
                qmodel.load_state_dict(qsd, strict=True)
                qdiff = compare_gguf_model(d, "model-q8_0.gguf", qmodel, tok, prompts)
                print(f"  model-q8_0.gguf via transformers vs our dequantization: max abs logit diff {qdiff:.3g}")
                assert qdiff < 1e-5
                qref, qprompts = tiny_reference(qmodel, tok, cfg, title + ", Q8_0 GGUF dequantized to FP32")
                qnp = check_numpy_gguf_forward(d / "model-q8_0.gguf", qprompts)
                print(f"  independent numpy forward on model-q8_0.gguf vs reference-q8_0: max abs logprob diff {qnp:.3g}")
                assert qnp < 1e-5
                qref["files"] = {"weights": "model-q8_0.gguf"}
                qref["gguf"] = {
                    "file": "model-q8_0.gguf",
                    "type": "Q8_0 for every 2-D tensor (incl. token_embd and output), F32 norms",
                    "max_abs_logit_diff_transformers_gguf_loader_vs_own_dequant": qdiff,
                }
                qref["generator"] = ref["generator"]
                write_json(d / "reference-q8_0.json", qref)
            else:
                print("  gguf.quants.quantize not available: skipping model-q8_0.gguf")
        write_json(d / "reference.json", ref)
    tiny_llama3(out_dir, vers)


def tiny_llama3(out_dir: Path, vers: dict) -> None:
    """A tiny Llama with Llama 3.1 rope scaling (rope_type llama3), as safetensors + config.json and as a
    GGUF carrying the same scaling as rope_freqs.weight. original_max_position_embeddings 64 with
    head_dim 16 and theta 5e5 puts the 8 frequencies in all three bands (kept, blended, divided)."""
    title = "tiny random Llama with Llama 3 rope scaling"
    print(f"{title}: reusing the tiny Llama tokenizer")
    tk = train_tiny_tokenizer("llama")
    d = out_dir / "tiny_llama3"
    cfg = tiny_config("llama")
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    seed = 4321
    sd = tiny_weights(cfg, seed, biases=False)
    write_tiny_checkpoint(d, "llama", cfg, sd, tk)
    model, tok = load_tiny(d)
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    assert rope.get("rope_type") == "llama3", rope
    ref, prompts = tiny_reference(model, tok, cfg, title)
    ref["files"] = {"weights": "model.safetensors", "tokenizer": "tokenizer.json", "config": "config.json"}
    ref["weights"] = {"seed": seed, "std": 0.02, "norm_weights": "1 + N(0, 0.1)", "biases": None}
    ref["generator"] = {"script": "scripts/reference/make_fixtures.py", "versions": vers}

    # How far plain RoPE (the scaling ignored) is from the reference: a tolerance well below this
    # catches an engine that reads the config but serves unscaled positions.
    plain_cfg = {k: v for k, v in cfg.items() if k != "rope_scaling"}
    with torch.no_grad():
        from transformers import AutoModelForCausalLM, LlamaConfig

        plain = AutoModelForCausalLM.from_config(LlamaConfig(**plain_cfg), attn_implementation="eager").eval()
        plain.load_state_dict(sd)
        worst = 0.0
        for p in prompts:
            ids = torch.tensor([p["token_ids"]])
            a = model(ids).logits[0].double().log_softmax(-1)
            b = plain(ids).logits[0].double().log_softmax(-1)
            worst = max(worst, (a - b).abs().max().item())
    ref["sensitivity"] = {"max_abs_logprob_change_rope_scaling_ignored": worst}
    print(f"  sensitivity: {ref['sensitivity']}")
    assert worst > 1e-3, "the prompts are too short for rope scaling to matter"

    write_tiny_gguf(d / "model.gguf", cfg, sd, tk)
    back = dequantized_state_dict(d / "model.gguf", cfg)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    npdiff = check_numpy_gguf_forward(d / "model.gguf", prompts)
    print(f"  independent numpy forward on model.gguf (rope_freqs.weight divisors) vs reference: {npdiff:.3g}")
    assert npdiff < 1e-5
    ref["gguf"] = {"file": "model.gguf", "type": "F32", "rope": "llama3 scaling as rope_freqs.weight"}
    write_json(d / "reference.json", ref)


# ----------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-smollm", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    vers = versions()
    print("versions:", vers)
    if not args.skip_smollm:
        if not args.model.exists():
            print(f"{args.model} not found: run scripts/fetch-model first", file=sys.stderr)
            return 1
        smollm(args.model.resolve(), out, vers)
    tiny(out, vers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
