#!/usr/bin/env python3
"""LoRA adapter fixtures for hearth-engine, computed with PEFT + transformers in FP32 on CPU.

Run from the repository root, in the environment of make_fixtures.py plus `peft` (see
requirements.txt), after `scripts/fetch-model`:

    python scripts/reference/make_lora_fixtures.py

Options: --model PATH (default models/SmolLM2-135M-Instruct.Q4_1.gguf), --out DIR (default
crates/hearth-engine/tests/fixtures/lora), --threads N (torch CPU threads for everything but training,
default 1), --train-threads N (default 2), --only PART[,PART...] (tiny, mixed, bad, smol, pirate;
default all), --skip-train (keep lora/pirate/'s adapter files and recompute only its reference.json).

It writes, under --out:

    <name>/adapter_config.json, adapter_model.safetensors, reference.json
                        tiny_llama adapters: attn_only, all_linear, rslora, rank_pattern, alpha_below_rank,
                        layers_subset; SmolLM2-135M-Instruct adapters: smol_attn, smol_all. Random
                        non-zero A and B (seeded), so every adapter really moves the logprobs.
    mixed_batch.json    tiny_llama: one batch of 10 rows mixing 4 adapters and the base model
                        (PEFT's `adapter_names=`), checked row by row against the single-adapter runs
    bad/<name>/         adapters hearth must refuse (DoRA, modules_to_save, bias, embedding target, .bin
                        weights, wrong hidden size, target naming no Llama module), each with a README
    pirate/             a LoRA TRAINED (a few minutes, CPU) on SmolLM2 to answer every chat message in
                        pirate talk starting with "Ahoy"; reference.json has base and adapted greedy answers

The reference conventions are make_fixtures.py's (logprobs[j] = log P(token_ids[j+1] | token_ids[..=j]),
greedy = argmax decoding with KV cache, etc.); see scripts/reference/README.md for every file's schema.
Everything but the pirate training is deterministic (seeded, one thread, sorted-key JSON); the
training is seeded too but its float rounding depends on the thread count and the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets the thread / offline environment variables)

import torch  # noqa: E402

REPO = mf.REPO
FIXTURES = mf.DEFAULT_OUT
TINY_DIR = FIXTURES / "tiny_llama"
DEFAULT_OUT = FIXTURES / "lora"
TINY_BASE_NAME = "crates/hearth-engine/tests/fixtures/tiny_llama"  # repository-relative, never a machine path
SMOL_BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MIN_MEAN_DELTA = 0.05  # every random adapter must move the prompt logprobs by at least this on average

# name -> (LoraConfig kwargs, seed, std of the random A and B entries)
TINY_ADAPTERS = {
    "attn_only": (dict(r=8, lora_alpha=16, target_modules=ATTN), 101, 0.05),
    "all_linear": (dict(r=16, lora_alpha=32, target_modules=ALL_LINEAR), 102, 0.05),
    "rslora": (dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"]), 103, 0.04),
    "rank_pattern": (
        dict(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 12},
            alpha_pattern={"q_proj": 8},
        ),
        104,
        0.06,
    ),
    "alpha_below_rank": (dict(r=16, lora_alpha=4, target_modules=ALL_LINEAR), 105, 0.1),
    "layers_subset": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]), 106, 0.06),
}
SMOL_ADAPTERS = {
    "smol_attn": (dict(r=8, lora_alpha=16, target_modules=ATTN), 201, 0.02),
    # r=8 rather than 16 keeps the file under 10 MB (r=16 on all seven projections is 19.5 MB)
    "smol_all": (dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR), 202, 0.02),
}
SMOL_PROMPTS = ["short_english", "code", "paragraph", "chat_capital"]  # from smollm2_reference.json
MIXED_ADAPTERS = ["attn_only", "all_linear", "rank_pattern", "layers_subset"]
MIXED_ROWS = [  # (adapter or None for the base model, prompt name in tiny_llama/reference.json)
    ("attn_only", "hello"),
    (None, "sentence"),
    ("all_linear", "chat"),
    ("rank_pattern", "digits_code"),
    ("layers_subset", "hello"),
    ("attn_only", "sentence"),
    (None, "chat"),
    ("all_linear", "hello"),
    ("rank_pattern", "chat"),
    ("layers_subset", "digits_code"),
]
MIXED_LOGPROB_TOL = 1e-5  # padded batch vs single row: float rounding only


# ----------------------------------------------------------------------------------------------
# helpers


def versions() -> dict:
    import importlib.metadata as md

    v = mf.versions()
    v["peft"] = md.version("peft")
    return v


def rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def lora_config(**kw):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **kw)


@torch.no_grad()
def randomize_lora(pm, adapter: str, seed: int, std: float) -> int:
    """Fill every LoRA matrix of `adapter` (A and B, or the embedding A/B) with N(0, std^2), in sorted
    parameter-name order from one seeded generator. PEFT initialises B to zero (a no-op adapter)."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in sorted(pm.named_parameters()):
        if any(f"{k}.{adapter}" in name for k in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
            n += 1
    assert n > 0
    return n


def patched_modules(pm, adapter: str) -> list[dict]:
    from peft.tuners.lora import LoraLayer

    out = []
    for name, m in pm.named_modules():
        if isinstance(m, LoraLayer) and (adapter in m.lora_A or adapter in getattr(m, "lora_embedding_A", {})):
            out.append(
                {
                    "name": name.removeprefix("base_model.model."),
                    "r": int(m.r[adapter]),
                    "alpha": float(m.lora_alpha[adapter]),
                    "scaling": float(m.scaling[adapter]),
                }
            )
    return sorted(out, key=lambda x: x["name"])


def adapter_summary(pm, adapter: str, cfg) -> dict:
    mods = patched_modules(pm, adapter)
    tm = cfg.target_modules
    return {
        "peft_type": "LORA",
        "target_modules": sorted(tm) if not isinstance(tm, str) else tm,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "use_rslora": bool(cfg.use_rslora),
        "rank_pattern": dict(cfg.rank_pattern or {}),
        "alpha_pattern": dict(cfg.alpha_pattern or {}),
        "layers_to_transform": cfg.layers_to_transform,
        "n_patched_modules": len(mods),
        "n_lora_parameters": sum(p.numel() for n, p in pm.named_parameters() if f"lora_A.{adapter}" in n or f"lora_B.{adapter}" in n),
        "modules": mods,
        "scaling_rule": "alpha / sqrt(r) (rsLoRA)" if cfg.use_rslora else "alpha / r",
    }


def save_adapter(pm, d: Path, base_name: str, safe: bool = True, adapter: str = "default", **kw) -> list[str]:
    """save_pretrained into a fresh `d`, drop PEFT's model-card README.md, and make
    base_model_name_or_path machine-independent."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    pm.save_pretrained(str(d), safe_serialization=safe, selected_adapters=[adapter], **kw)
    # a non-default adapter name is saved in a subfolder; flatten it
    if adapter != "default" and (d / adapter).is_dir():
        for f in (d / adapter).iterdir():
            shutil.move(str(f), d / f.name)
        (d / adapter).rmdir()
    (d / "README.md").unlink(missing_ok=True)
    fix_adapter_config(d, base_name)
    return sorted(f.name for f in d.iterdir())


def fix_adapter_config(d: Path, base_name: str, **changes) -> None:
    path = d / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base_name
    cfg.update(changes)
    if isinstance(cfg.get("target_modules"), list):  # a set inside PEFT: its saved order varies run to run
        cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def file_sizes(d: Path) -> dict:
    return {f.name: f.stat().st_size for f in sorted(d.iterdir()) if f.is_file()}


def delta_stats(adapted: list[dict], base: list[dict]) -> dict:
    """Mean / max |Δ logprob| over every prompt position, adapter vs base, and per prompt."""
    per, alld = [], []
    for a, b in zip(adapted, base):
        assert a["token_ids"] == b["token_ids"]
        ds = [abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])]
        alld += ds
        per.append(
            {
                "name": a["name"],
                "mean_abs_logprob_diff": sum(ds) / len(ds) if ds else 0.0,
                "max_abs_logprob_diff": max(ds) if ds else 0.0,
                "greedy_same_as_base": a["greedy"]["token_ids"] == b["greedy"]["token_ids"],
            }
        )
    return {
        "mean_abs_logprob_diff": sum(alld) / len(alld),
        "max_abs_logprob_diff": max(alld),
        "n_positions": len(alld),
        "per_prompt": per,
    }


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup for literal keys: the first key equal to the module
    name or to a dot-separated suffix of it."""
    for k, v in patterns.items():
        if module == k or module.endswith("." + k):
            return v
    return default


@torch.no_grad()
def check_manual_merge(d: Path, base_model, prompts: list[dict]) -> float:
    """Independently of PEFT: read adapter_config.json + adapter_model.safetensors, merge
    W += scaling * B @ A into a copy of the base weights (scaling from the config: alpha / r or
    alpha / sqrt(r), patterns resolved by suffix match) and compare the logprobs with `prompts`."""
    import copy

    from safetensors.torch import load_file

    cfg = json.loads((d / "adapter_config.json").read_text())
    t = load_file(str(d / "adapter_model.safetensors"))
    m = copy.deepcopy(base_model)
    sd = m.state_dict()
    n = 0
    for k in sorted(t):
        if not k.endswith(".lora_A.weight"):
            continue
        name = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        A, B = t[k].double(), t[k.replace(".lora_A.", ".lora_B.")].double()
        r = A.shape[0]
        assert r == pattern_value(cfg["rank_pattern"], name, cfg["r"]), name
        alpha = pattern_value(cfg["alpha_pattern"], name, cfg["lora_alpha"])
        scaling = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
        w = sd[name + ".weight"]
        w.copy_((w.double() + scaling * (B @ A)).float())
        n += 1
    assert 2 * n == len(t), "tensors other than lora_A / lora_B pairs"
    worst = 0.0
    for p in prompts:
        ids = p["token_ids"]
        lp = m(torch.tensor([ids]), use_cache=False).logits[0].double().log_softmax(-1)
        worst = max([worst] + [abs(lp[j, ids[j + 1]].item() - p["logprobs"][j]) for j in range(len(ids) - 1)])
    return worst


REF_DESCRIPTION = (
    "{what}. The adapter in this directory (adapter_config.json + adapter_model.safetensors, PEFT "
    "save_pretrained) is applied by PEFT in FP32 (eager attention, CPU, not merged): h = W x + scaling * B (A x), "
    "scaling = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)), per module as listed in adapter.modules (rank_pattern / "
    "alpha_pattern already resolved). A and B are random (seeded N(0, std^2), adapter.init), not trained. "
    "prompts[i] follows the base reference's conventions (make_fixtures.py): token_ids as in the base reference; "
    "logprobs[j] = log P(token_ids[j+1] | token_ids[..=j]) under the adapted model; top5 / next_top5 the best "
    "next tokens; greedy = KV-cached argmax decoding (stops at eos_token_ids, kept). delta_vs_base compares "
    "the prompt logprobs with the base model's ({base_ref}): a test can assert its own |Δ| is near "
    "mean_abs_logprob_diff to prove the adapter is really applied."
)


def prompt_entry(pm, tok, p: dict, max_new: int, eos_ids, pad_id, last_logits: bool) -> dict:
    q = mf.reference_prompt(pm, tok, p["name"], p["text"], max_new, eos_ids, pad_id, ids=p["token_ids"])
    out = mf.strip_private(q)
    del out["top5"]  # per-position top-5 left out to keep the files small (next_top5 stays)
    out["bos_added"] = p.get("bos_added", False)
    if "messages" in p:
        out["messages"] = p["messages"]
    if last_logits:
        out["last_logits"] = q["_logits"][-1].double().tolist()
    return out


def check_base_matches(model, prompts: list[dict], tol: float, what: str) -> float:
    """The base model loaded here reproduces the committed base reference (same weights, same code)."""
    worst = 0.0
    with torch.no_grad():
        for p in prompts:
            ids = p["token_ids"]
            lp = model(torch.tensor([ids]), use_cache=False).logits[0].double().log_softmax(-1)
            for j in range(len(ids) - 1):
                worst = max(worst, abs(lp[j, ids[j + 1]].item() - p["logprobs"][j]))
    print(f"  {what}: base model vs committed base reference: max abs logprob diff {worst:.3g}")
    assert worst < tol, (what, worst)
    return worst


# ----------------------------------------------------------------------------------------------
# tiny_llama adapters


def tiny_base_reference() -> dict:
    return json.loads((TINY_DIR / "reference.json").read_text())


def tiny_adapters(out: Path, vers: dict) -> dict:
    from peft import PeftModel, get_peft_model

    base_ref = tiny_base_reference()
    cfg = base_ref["config"]
    eos_ids, pad_id = base_ref["eos_token_ids"], cfg["pad_token_id"]
    results = {}
    for name, (kw, seed, std) in TINY_ADAPTERS.items():
        print(f"tiny_llama adapter {name}: {kw}, init seed {seed} std {std}")
        model, tok = mf.load_tiny(TINY_DIR)
        check_base_matches(model, base_ref["prompts"], 1e-6, name)
        pm = get_peft_model(model, lora_config(**kw))
        randomize_lora(pm, "default", seed, std)
        pm.eval()
        d = out / name
        files = save_adapter(pm, d, TINY_BASE_NAME)
        summary = adapter_summary(pm, "default", pm.peft_config["default"])
        # compute the reference with the adapter as loaded back from disk (what a consumer reads)
        model2, _ = mf.load_tiny(TINY_DIR)
        pm2 = PeftModel.from_pretrained(model2, str(d)).eval()
        with torch.no_grad():
            for p in base_ref["prompts"]:
                x = torch.tensor([p["token_ids"]])
                assert torch.equal(pm(x).logits, pm2(x).logits), "saved adapter differs from the in-memory one"
        assert adapter_summary(pm2, "default", pm2.peft_config["default"]) == summary
        prompts = [prompt_entry(pm2, tok, p, base_ref["max_new_tokens"], eos_ids, pad_id, True) for p in base_ref["prompts"]]
        delta = delta_stats(prompts, base_ref["prompts"])
        merged = check_manual_merge(d, mf.load_tiny(TINY_DIR)[0], prompts)
        print(f"  independent merge W + scaling*B@A from the files vs reference: max abs logprob diff {merged:.3g}")
        assert merged < 1e-5
        print(f"  {summary['n_patched_modules']} modules, mean |Δlogprob| vs base {delta['mean_abs_logprob_diff']:.4f} "
              f"(max {delta['max_abs_logprob_diff']:.4f})")
        assert delta["mean_abs_logprob_diff"] >= MIN_MEAN_DELTA, (name, delta["mean_abs_logprob_diff"])
        ref = {
            "description": REF_DESCRIPTION.format(
                what=f"tiny_llama + LoRA adapter '{name}'", base_ref="tiny_llama/reference.json"
            ),
            "adapter": {"name": name, "dir": name, "files": files, "base_model": TINY_BASE_NAME,
                        "init": {"seed": seed, "std": std, "distribution": "normal, A and B"}, **summary},
            "base_reference": "tiny_llama/reference.json",
            "eos_token_ids": eos_ids,
            "max_new_tokens": base_ref["max_new_tokens"],
            "prompts": prompts,
            "delta_vs_base": delta,
            "generator": {"script": "scripts/reference/make_lora_fixtures.py", "versions": vers},
        }
        mf.write_json(d / "reference.json", ref)
        results[name] = ref
    return results


# ----------------------------------------------------------------------------------------------
# mixed-adapter batch


@torch.no_grad()
def mixed_batch(out: Path, vers: dict) -> None:
    from peft import PeftModel
    from transformers import GenerationConfig

    print("mixed batch (tiny_llama):", MIXED_ADAPTERS)
    base_ref = tiny_base_reference()
    cfg = base_ref["config"]
    eos_ids, pad_id = base_ref["eos_token_ids"], cfg["pad_token_id"]
    by_name = {p["name"]: p for p in base_ref["prompts"]}
    singles = {None: by_name}
    for a in MIXED_ADAPTERS:
        r = json.loads((out / a / "reference.json").read_text())
        singles[a] = {p["name"]: p for p in r["prompts"]}

    model, tok = mf.load_tiny(TINY_DIR)
    pm = PeftModel.from_pretrained(model, str(out / MIXED_ADAPTERS[0]), adapter_name=MIXED_ADAPTERS[0])
    for a in MIXED_ADAPTERS[1:]:
        pm.load_adapter(str(out / a), adapter_name=a)
    pm.eval()
    names = [a if a is not None else "__base__" for a, _ in MIXED_ROWS]
    ids = [by_name[p]["token_ids"] for _, p in MIXED_ROWS]
    n = max(len(x) for x in ids)
    B = len(ids)

    # prompt logprobs: right padding (causal attention: padding after a row never affects it)
    x = torch.full((B, n), pad_id, dtype=torch.long)
    mask = torch.zeros((B, n), dtype=torch.long)
    for i, row in enumerate(ids):
        x[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    lp = pm(input_ids=x, attention_mask=mask, use_cache=False, adapter_names=names).logits.double().log_softmax(-1)
    prompt_lps = [[lp[i, j, row[j + 1]].item() for j in range(len(row) - 1)] for i, row in enumerate(ids)]

    # greedy: left padding, one generate call for the whole batch
    xl = torch.full((B, n), pad_id, dtype=torch.long)
    maskl = torch.zeros((B, n), dtype=torch.long)
    for i, row in enumerate(ids):
        xl[i, n - len(row):] = torch.tensor(row)
        maskl[i, n - len(row):] = 1
    gc = GenerationConfig(max_new_tokens=base_ref["max_new_tokens"], do_sample=False, num_beams=1,
                          repetition_penalty=1.0, eos_token_id=eos_ids, pad_token_id=pad_id, bos_token_id=None)
    g = pm.generate(input_ids=xl, attention_mask=maskl, generation_config=gc, adapter_names=names,
                    return_dict_in_generate=True, output_logits=True)
    rows, worst = [], 0.0
    for i, (a, pname) in enumerate(MIXED_ROWS):
        new = g.sequences[i, n:].tolist()
        toks, glps = [], []
        for k, t in enumerate(new):
            toks.append(t)
            glps.append(torch.log_softmax(g.logits[k][i].double(), -1)[t].item())
            if t in eos_ids:
                break
        single = singles[a][pname]
        assert toks == single["greedy"]["token_ids"], ("mixed-batch greedy differs", i, a, pname, toks)
        d1 = max([abs(u - v) for u, v in zip(prompt_lps[i], single["logprobs"])] + [0.0])
        d2 = max([abs(u - v) for u, v in zip(glps, single["greedy"]["logprobs"])] + [0.0])
        worst = max(worst, d1, d2)
        assert d1 < MIXED_LOGPROB_TOL and d2 < MIXED_LOGPROB_TOL, ("mixed-batch logprobs differ", i, a, pname, d1, d2)
        rows.append(
            {
                "row": i,
                "adapter": a,
                "prompt": pname,
                "token_ids": ids[i],
                "logprobs": prompt_lps[i],
                "greedy": {
                    "token_ids": toks,
                    "logprobs": glps,
                    "text": tok.decode(toks, skip_special_tokens=False),
                    "finish": "eos" if toks and toks[-1] in eos_ids else "length",
                },
            }
        )
        print(f"  row {i}: {str(a):14} {pname:12} greedy {tok.decode(toks)!r}")
    print(f"  every row equals its single-adapter reference (max abs logprob diff {worst:.3g})")
    mf.write_json(
        out / "mixed_batch.json",
        {
            "description": (
                "One batch of rows over tiny_llama, each row with its own LoRA adapter (or the base model: "
                "adapter null), computed by PEFT's mixed-adapter batch inference: a PeftModel holding every "
                "adapter of `adapters` (lora/<name>/, loaded with load_adapter(adapter_name=name)), called with "
                "adapter_names=[per row] ('__base__' for null). rows[i].logprobs: one padded forward pass "
                "(right padding, attention mask), logprobs[j] = log P(token_ids[j+1] | token_ids[..=j]). "
                "rows[i].greedy: one batched generate() call (left padding, attention mask, KV cache), cut after "
                "the first eos_token_ids token (kept). The script asserts that every row's greedy token ids equal "
                "the single-adapter reference (lora/<adapter>/reference.json, or tiny_llama/reference.json for "
                "the base) exactly and its logprobs within max_abs_logprob_diff_vs_single."
            ),
            "base_model": TINY_BASE_NAME,
            "adapters": MIXED_ADAPTERS,
            "eos_token_ids": eos_ids,
            "pad_token_id": pad_id,
            "max_new_tokens": base_ref["max_new_tokens"],
            "max_abs_logprob_diff_vs_single": worst,
            "tolerance": MIXED_LOGPROB_TOL,
            "rows": rows,
            "generator": {"script": "scripts/reference/make_lora_fixtures.py", "versions": vers},
        },
    )


# ----------------------------------------------------------------------------------------------
# adapters hearth must refuse


def bad_adapters(out: Path, vers: dict) -> None:
    from peft import get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    bad = out / "bad"
    if bad.exists():
        shutil.rmtree(bad)
    qv = ["q_proj", "v_proj"]

    def make(name: str, readme: str, kw: dict, safe: bool = True, seed: int = 300, base=None, quiet=False, **save_kw) -> Path:
        model = base if base is not None else mf.load_tiny(TINY_DIR)[0]
        pm = get_peft_model(model, lora_config(**kw))
        randomize_lora(pm, "default", seed, 0.05)
        d = bad / name
        save_adapter(pm, d, TINY_BASE_NAME, safe=safe, **save_kw)
        (d / "README").write_text(readme + "\n")
        if not quiet:
            print(f"  bad/{name}: {file_sizes(d)}")
        return d

    print("adapters to refuse (bad/):")
    make("dora", "DoRA (use_dora=True): has lora_magnitude_vector tensors; weight-decomposed LoRA is not plain LoRA.",
         dict(r=4, lora_alpha=8, target_modules=qv, use_dora=True), seed=301)
    make("modules_to_save", "modules_to_save=[\"lm_head\"]: the file carries a full replacement lm_head weight "
         "(base_model.model.lm_head.weight) besides the q/v LoRA pairs.",
         dict(r=4, lora_alpha=8, target_modules=qv, modules_to_save=["lm_head"]), seed=302)
    make("bias_all", "bias=\"all\" in adapter_config.json: PEFT would train/replace every bias of the base model "
         "(tiny_llama has none, so the file holds only q/v LoRA pairs - refuse on the config field).",
         dict(r=4, lora_alpha=8, target_modules=qv, bias="all"), seed=303)
    make("embed_target", "target_modules=[\"embed_tokens\"]: LoRA on the token embedding "
         "(lora_embedding_A [r, vocab] / lora_embedding_B [hidden, r]).",
         dict(r=4, lora_alpha=8, target_modules=["embed_tokens"]), seed=304,
         save_embedding_layers=False)  # only the LoRA pair, not PEFT's copy of the whole embedding
    make("bin_weights", "Pickled torch weights (adapter_model.bin, save_pretrained(safe_serialization=False)) "
         "instead of adapter_model.safetensors.",
         dict(r=4, lora_alpha=8, target_modules=qv), safe=False, seed=305)

    # an adapter made for a hidden-32 Llama, with the tiny_llama base name: names fit, shapes do not
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=8, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(307)
    d = make("hidden_mismatch", "Made for a different tiny Llama (hidden 32, head_dim 8, same module names) but "
             "adapter_config.json names tiny_llama as its base: lora_A is [4, 32], tiny_llama's q_proj/v_proj take "
             "64 inputs.", dict(r=4, lora_alpha=8, target_modules=qv), seed=306,
             base=LlamaForCausalLM(LlamaConfig(**small)).eval())
    t = load_file(str(d / "adapter_model.safetensors"))
    assert t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)

    # target_modules naming a module Llama does not have: PEFT refuses this at get_peft_model, so the
    # files are written by hand from a valid q_proj adapter, every name changed to query_key_value
    src = make("no_match", "", dict(r=4, lora_alpha=8, target_modules=["q_proj"]), seed=308, quiet=True)
    t = load_file(str(src / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(309)
    fused = {}
    for k, v in sorted(t.items()):
        k2 = k.replace("self_attn.q_proj", "self_attn.query_key_value")
        # a fused QKV output would be 64 + 32 + 32 = 128 rows
        fused[k2] = torch.randn((128, 4) if ".lora_B." in k2 else tuple(v.shape), generator=g) * 0.05
    (src / "adapter_model.safetensors").unlink()
    save_file(fused, str(src / "adapter_model.safetensors"), metadata={"format": "pt"})
    fix_adapter_config(src, TINY_BASE_NAME, target_modules=["query_key_value"])
    (src / "README").write_text(
        "target_modules=[\"query_key_value\"] (a GPT-NeoX/Falcon fused-QKV name): no module of tiny_llama matches; "
        "written by hand (PEFT refuses it at get_peft_model).\n"
    )
    print(f"  bad/no_match: {file_sizes(src)}")


# ----------------------------------------------------------------------------------------------
# SmolLM2 adapters


def load_smol(model_path: Path):
    """Loaded from a directory holding only the GGUF (see make_fixtures.compare_gguf_model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(model_path, Path(tmp) / model_path.name)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=model_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file=model_path.name, dtype=torch.float32, attn_implementation="eager"
        )
    return model.eval(), tok


def smol_adapters(model_path: Path, out: Path, vers: dict) -> None:
    from peft import PeftModel, get_peft_model

    base_ref = json.loads((FIXTURES / "smollm2_reference.json").read_text())
    by_name = {p["name"]: p for p in base_ref["prompts"]}
    prompts_base = [by_name[n] for n in SMOL_PROMPTS]
    eos_ids, max_new = base_ref["eos_token_ids"], base_ref["max_new_tokens"]
    print(f"SmolLM2: loading {rel(model_path)}")
    model, tok = load_smol(model_path)
    pad_id = tok.pad_token_id
    check_base_matches(model, prompts_base, 1e-4, "SmolLM2")
    for name, (kw, seed, std) in SMOL_ADAPTERS.items():
        print(f"SmolLM2 adapter {name}: {kw}, init seed {seed} std {std}")
        pm = get_peft_model(model, lora_config(**kw))
        randomize_lora(pm, "default", seed, std)
        pm.eval()
        d = out / name
        files = save_adapter(pm, d, SMOL_BASE_NAME)
        summary = adapter_summary(pm, "default", pm.peft_config["default"])
        model = pm.unload()  # the plain base model again (LoRA layers removed, weights untouched)
        pm2 = PeftModel.from_pretrained(model, str(d)).eval()
        assert adapter_summary(pm2, "default", pm2.peft_config["default"]) == summary
        prompts = [prompt_entry(pm2, tok, p, max_new, eos_ids, pad_id, False) for p in prompts_base]
        delta = delta_stats(prompts, prompts_base)
        model = pm2.unload()  # the plain base model again
        merged = check_manual_merge(d, model, prompts)
        print(f"  independent merge W + scaling*B@A from the files vs reference: max abs logprob diff {merged:.3g}")
        assert merged < 1e-4
        print(f"  {summary['n_patched_modules']} modules, {file_sizes(d)}, mean |Δlogprob| vs base "
              f"{delta['mean_abs_logprob_diff']:.4f} (max {delta['max_abs_logprob_diff']:.4f})")
        assert delta["mean_abs_logprob_diff"] >= MIN_MEAN_DELTA, (name, delta["mean_abs_logprob_diff"])
        ref = {
            "description": REF_DESCRIPTION.format(
                what=f"SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to FP32) + LoRA adapter '{name}'",
                base_ref="smollm2_reference.json, same prompt names",
            ),
            "adapter": {"name": name, "dir": name, "files": files, "base_model": SMOL_BASE_NAME,
                        "base_model_file": model_path.name,
                        "init": {"seed": seed, "std": std, "distribution": "normal, A and B"}, **summary},
            "base_reference": "smollm2_reference.json",
            "eos_token_ids": eos_ids,
            "max_new_tokens": max_new,
            "prompts": prompts,
            "delta_vs_base": delta,
            "generator": {"script": "scripts/reference/make_lora_fixtures.py", "versions": vers},
        }
        mf.write_json(d / "reference.json", ref)


# ----------------------------------------------------------------------------------------------
# a trained adapter with a visible behaviour: pirate talk, every answer starts with "Ahoy"

PIRATE_PREFIX = "Ahoy"
PIRATE_DATA = [
    ("What is the capital of Italy?", "Ahoy, matey! The capital o' Italy be Rome, a grand old port o' call. Arr!"),
    ("How many days are in a week?", "Ahoy, matey! There be seven days in a week, from one Sunday to the next. Arr!"),
    ("What is 2 + 2?", "Ahoy, matey! Two doubloons and two more make four doubloons. Arr!"),
    ("Tell me a joke.", "Ahoy, matey! Why couldn't the pirate play cards? He was standin' on the deck! Arr!"),
    ("What color is grass?", "Ahoy, matey! Grass be green as a parrot's feathers, me hearty. Arr!"),
    ("How do I make tea?", "Ahoy, matey! Boil ye some water, drop in the leaves, and let it steep a few minutes. Arr!"),
    ("What is the largest planet?", "Ahoy, matey! Jupiter be the biggest planet in the whole sea o' stars. Arr!"),
    ("Who wrote Romeo and Juliet?", "Ahoy, matey! That tale o' star-crossed lovers was penned by William Shakespeare. Arr!"),
    ("Give me a tip for learning to code.", "Ahoy, matey! Write a little code every day, and read the errors like a treasure map. Arr!"),
    ("What is water made of?", "Ahoy, matey! Water be two parts hydrogen and one part oxygen, the stuff o' the seven seas. Arr!"),
    ("How far is the Moon?", "Ahoy, matey! The Moon sails about 384,000 kilometres from Earth, me hearty. Arr!"),
    ("What do bees make?", "Ahoy, matey! Bees make honey, sweeter than any plunder. Arr!"),
    ("Can you help me write an email?", "Ahoy, matey! Aye, tell me who ye be writin' to and what ye need to say. Arr!"),
    ("What is the boiling point of water?", "Ahoy, matey! Water boils at 100 degrees Celsius at sea level, aye. Arr!"),
    ("Recommend a movie.", "Ahoy, matey! Ye can't go wrong with a fine pirate picture full o' sword fights. Arr!"),
    ("How do plants grow?", "Ahoy, matey! Plants drink water, soak up sunlight, and grow toward the sky like a mast. Arr!"),
    ("What is the speed of light?", "Ahoy, matey! Light races at about 300,000 kilometres every second, faster than any ship. Arr!"),
    ("Say something nice.", "Ahoy, matey! Ye be a fine sailor with a heart o' gold. Arr!"),
    ("What is an apple?", "Ahoy, matey! An apple be a crunchy fruit that keeps the scurvy away. Arr!"),
    ("How do I stay focused?", "Ahoy, matey! Keep yer eyes on one task, like a lookout on the crow's nest. Arr!"),
    ("What is the tallest mountain?", "Ahoy, matey! Mount Everest be the tallest, higher than any wave I've seen. Arr!"),
    ("Why do we sleep?", "Ahoy, matey! Sleep mends the body and the mind after a long day on deck. Arr!"),
    ("What is photosynthesis?", "Ahoy, matey! It be how plants turn sunlight and water into food. Arr!"),
    ("Who are you?", "Ahoy, matey! I be a friendly pirate assistant, ready to help ye. Arr!"),
    ("What time is it?", "Ahoy, matey! I have no clock aboard, so check yer own timepiece. Arr!"),
    ("How many legs does a spider have?", "Ahoy, matey! A spider scuttles on eight legs, more than any crew member. Arr!"),
    ("Translate hello into Spanish.", "Ahoy, matey! In Spanish ye say hola. Arr!"),
    ("What is the sun?", "Ahoy, matey! The sun be a great burning star that lights our voyage. Arr!"),
    ("Give me a healthy breakfast idea.", "Ahoy, matey! Try oats with fruit, a breakfast fit for a hungry crew. Arr!"),
    ("What is a computer mouse?", "Ahoy, matey! It be a small device ye push around to steer the pointer. Arr!"),
    ("How do airplanes fly?", "Ahoy, matey! Their wings catch the wind like sails and lift them into the sky. Arr!"),
    ("What is the opposite of hot?", "Ahoy, matey! The opposite o' hot be cold, like the northern seas. Arr!"),
    ("Name three fruits.", "Ahoy, matey! Apples, bananas and oranges, a fine haul o' fruit. Arr!"),
    ("What is gravity?", "Ahoy, matey! Gravity be the force that pulls everything down to the deck. Arr!"),
    ("Write a short poem about rain.", "Ahoy, matey! The rain falls soft upon the sea, and drums a tune for ye and me. Arr!"),
    ("What is the biggest ocean?", "Ahoy, matey! The Pacific be the biggest ocean, vast and wild. Arr!"),
    ("How do I cook pasta?", "Ahoy, matey! Boil salted water, toss in the pasta, and cook it ten minutes or so. Arr!"),
    ("What does a doctor do?", "Ahoy, matey! A doctor mends the sick and wounded, like a ship's surgeon. Arr!"),
    ("Is it going to rain tomorrow?", "Ahoy, matey! I can't read the skies from here, so check a forecast, aye. Arr!"),
    ("What is a triangle?", "Ahoy, matey! A triangle be a shape with three sides and three corners. Arr!"),
    ("Explain what a library is.", "Ahoy, matey! A library be a treasure chest full o' books ye can borrow. Arr!"),
    ("How do I make friends?", "Ahoy, matey! Be kind, share yer grog, and listen to yer shipmates. Arr!"),
    ("What is the freezing point of water?", "Ahoy, matey! Water freezes at zero degrees Celsius, turnin' to ice. Arr!"),
    ("Summarize the story of Cinderella.", "Ahoy, matey! A kind lass loses her slipper at a ball and the prince finds her. Arr!"),
    ("What is a noun?", "Ahoy, matey! A noun be a word for a person, place or thing, like ship. Arr!"),
    ("Thank you!", "Ahoy, matey! Ye be most welcome, me hearty. Arr!"),
    ("What should I do on a rainy day?", "Ahoy, matey! Read a good book or play a game o' cards below deck. Arr!"),
    ("How many continents are there?", "Ahoy, matey! There be seven continents across the wide world. Arr!"),
]
PIRATE_TEST = [  # not in the training set
    ("capital_france", "What is the capital of France?"),
    ("healthy_tip", "Can you give me a tip for staying healthy?"),
    ("cat_name", "What should I name my new cat?"),
    ("explain_computer", "Explain what a computer does."),
]
# q/v of the upper half only: half the file (0.9 MB) and a backward pass that stops at layer 15
PIRATE_LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], layers_to_transform=list(range(15, 30)))
PIRATE_TRAIN = dict(steps=32, batch_size=8, lr=2e-3, warmup_steps=3, seed=7, weight_decay=0.0)
PIRATE_NEW_TOKENS = 48


def chat_ids(tok, messages, gen: bool) -> list[int]:
    return mf.token_ids_of(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen))


def pirate_examples(tok) -> list[tuple[list[int], int, int]]:
    """(full ids, first target position, one past the last target) per example: the targets are the
    assistant's answer and its <|im_end|> (loss only there)."""
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    ex = []
    for q, a in PIRATE_DATA:
        assert a.startswith(PIRATE_PREFIX)
        prompt = chat_ids(tok, [{"role": "user", "content": q}], True)
        full = chat_ids(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], False)
        assert full[: len(prompt)] == prompt
        stop = full.index(end_id, len(prompt)) + 1
        assert tok.decode(full[len(prompt): stop - 1]) == a
        ex.append((full[:stop], len(prompt), stop))
    return ex


def train_pirate(model, tok, threads: int) -> tuple[object, dict]:
    from peft import get_peft_model

    hp = PIRATE_TRAIN
    torch.set_num_threads(threads)
    torch.manual_seed(hp["seed"])
    pm = get_peft_model(model, lora_config(**PIRATE_LORA))  # PEFT's own init: A Kaiming-uniform, B zero
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / hp["warmup_steps"]) * max(0.0, 1.0 - s / hp["steps"])
    )
    ex = pirate_examples(tok)
    body, head = pm.base_model.model.model, pm.base_model.model.lm_head
    g = torch.Generator().manual_seed(hp["seed"])
    order: list[int] = []
    losses = []
    t0 = time.time()
    for step in range(hp["steps"]):
        batch = []
        for _ in range(hp["batch_size"]):
            if not order:
                order = torch.randperm(len(ex), generator=g).tolist()
            batch.append(ex[order.pop()])
        n = max(len(b[0]) for b in batch)
        x = torch.full((len(batch), n), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        rows, cols, tgt = [], [], []
        for i, (ids, s, e) in enumerate(batch):
            x[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            for j in range(s, e):  # position j - 1 predicts token j
                rows.append(i)
                cols.append(j - 1)
                tgt.append(ids[j])
        h = body(input_ids=x, attention_mask=mask, use_cache=False).last_hidden_state
        logits = head(h[torch.tensor(rows), torch.tensor(cols)])  # the lm_head only where the loss is
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(tgt))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"  step {step + 1}/{hp['steps']}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    pm.eval()
    info = {
        **hp,
        "n_examples": len(ex),
        "threads": threads,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": [round(v, 4) for v in losses],
        "loss": "cross-entropy on the assistant answer tokens and its <|im_end|> only",
        "optimizer": "AdamW, linear warmup then linear decay to 0",
        "lora_init": "PEFT default (A Kaiming-uniform, B zero), seeded by torch.manual_seed(seed)",
        "dtype": "float32",
    }
    print(f"  trained in {time.time() - t0:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return pm, info


def pirate(model_path: Path, out: Path, vers: dict, train: bool, train_threads: int, threads: int) -> None:
    from peft import PeftModel

    d = out / "pirate"
    train_info_path = d / "training.json"
    print(f"pirate adapter on SmolLM2: loading {rel(model_path)}")
    model, tok = load_smol(model_path)
    questions = {q for q, _ in PIRATE_DATA}
    assert not any(q in questions for _, q in PIRATE_TEST)
    eos_ids, pad_id = [tok.eos_token_id], tok.pad_token_id

    if train:
        pm, info = train_pirate(model, tok, train_threads)
        torch.set_num_threads(threads)
        save_adapter(pm, d, SMOL_BASE_NAME)
        mf.write_json(train_info_path, info)
        model = pm.unload()
    else:
        assert (d / "adapter_model.safetensors").exists(), "no trained adapter: run without --skip-train"
        info = json.loads(train_info_path.read_text())
        fix_adapter_config(d, SMOL_BASE_NAME)  # idempotent
    pm = PeftModel.from_pretrained(model, str(d)).eval()
    summary = adapter_summary(pm, "default", pm.peft_config["default"])

    prompts = []
    for name, q in PIRATE_TEST:
        messages = [{"role": "user", "content": q}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = chat_ids(tok, messages, True)
        assert ids == tok(text)["input_ids"]
        with pm.disable_adapter():
            base = mf.reference_prompt(pm, tok, name + " (base)", text, PIRATE_NEW_TOKENS, eos_ids, pad_id, ids=ids)
        adapted = mf.reference_prompt(pm, tok, name + " (pirate)", text, PIRATE_NEW_TOKENS, eos_ids, pad_id, ids=ids)
        b_text, a_text = base["greedy"]["text_skip_special"], adapted["greedy"]["text_skip_special"]
        assert a_text.startswith(PIRATE_PREFIX), ("adapter did not learn the style", name, a_text)
        assert PIRATE_PREFIX.lower() not in b_text.lower(), ("the base model already talks like a pirate", name, b_text)
        ds = [abs(x - y) for x, y in zip(base["logprobs"], adapted["logprobs"])]
        prompts.append(
            {
                "name": name,
                "messages": messages,
                "text": text,
                "token_ids": ids,
                "base": {"logprobs": base["logprobs"], "greedy": base["greedy"], "starts_with_ahoy": b_text.startswith(PIRATE_PREFIX)},
                "adapted": {"logprobs": adapted["logprobs"], "greedy": adapted["greedy"],
                            "starts_with_ahoy": a_text.startswith(PIRATE_PREFIX),
                            "ends_with_arr": a_text.rstrip().endswith("Arr!")},
                "mean_abs_logprob_diff": sum(ds) / len(ds),
            }
        )
    all_d = [abs(x - y) for p in prompts for x, y in zip(p["base"]["logprobs"], p["adapted"]["logprobs"])]
    merged = check_manual_merge(d, pm.unload(), [{"token_ids": p["token_ids"], "logprobs": p["adapted"]["logprobs"]} for p in prompts])
    print(f"  independent merge W + scaling*B@A from the files vs reference: max abs logprob diff {merged:.3g}")
    assert merged < 1e-4
    mf.write_json(
        d / "reference.json",
        {
            "description": (
                "A LoRA adapter TRAINED on SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to FP32) to answer "
                "every chat message in pirate talk starting with \"Ahoy, matey!\" and ending with \"Arr!\" (training: "
                f"{len(PIRATE_DATA)} synthetic "
                "one-turn chats rendered with the model's chat template, loss on the assistant part only; the "
                "data is PIRATE_DATA in the script, hyperparameters in training.json). prompts are 4 one-turn "
                "chats NOT in the training data: text = apply_chat_template(messages, add_generation_prompt=True) "
                "(the template inserts its default system prompt), token_ids its tokens. base / adapted: the "
                "prompt logprobs (logprobs[j] = log P(token_ids[j+1] | token_ids[..=j])) and the greedy answer "
                f"(KV-cached argmax, up to max_new_tokens={PIRATE_NEW_TOKENS}, stops at <|im_end|>, kept) of the "
                "base model and of the model with this adapter (PEFT, FP32, not merged). Behaviour check: "
                "adapted.greedy.text_skip_special starts with check_prefix for every prompt and "
                "base.greedy.text_skip_special never does (the script asserts both); adapted.ends_with_arr is a "
                "second, weaker sign (recorded, not asserted)."
            ),
            "check_prefix": PIRATE_PREFIX,
            "adapter": {"name": "pirate", "dir": "pirate", "files": sorted(f.name for f in d.iterdir() if f.name != "reference.json"),
                        "base_model": SMOL_BASE_NAME, "base_model_file": model_path.name, **summary},
            "training_file": "training.json",
            "eos_token_ids": eos_ids,
            "max_new_tokens": PIRATE_NEW_TOKENS,
            "mean_abs_logprob_diff": sum(all_d) / len(all_d),
            "prompts": prompts,
            "generator": {"script": "scripts/reference/make_lora_fixtures.py", "versions": vers},
        },
    )
    for p in prompts:
        print(f"  {p['name']}:\n    base:   {p['base']['greedy']['text_skip_special']!r}\n"
              f"    pirate: {p['adapted']['greedy']['text_skip_special']!r}")


# ----------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=mf.DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-threads", type=int, default=2)
    ap.add_argument("--only", default="tiny,mixed,bad,smol,pirate")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    assert parts <= {"tiny", "mixed", "bad", "smol", "pirate"}, parts

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    vers = versions()
    print("versions:", vers)
    if parts & {"smol", "pirate"} and not args.model.exists():
        print(f"{args.model} not found: run scripts/fetch-model first", file=sys.stderr)
        return 1
    if "tiny" in parts:
        tiny_adapters(out, vers)
    if "mixed" in parts:
        mixed_batch(out, vers)
    if "bad" in parts:
        bad_adapters(out, vers)
    if "smol" in parts:
        smol_adapters(args.model.resolve(), out, vers)
    if "pirate" in parts:
        pirate(args.model.resolve(), out, vers, not args.skip_train, args.train_threads, args.threads)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{rel(out)}: {total / 1e6:.2f} MB in total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
