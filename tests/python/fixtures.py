"""Test data for the hearth end-to-end suite: tiny checkpoints written by the tests themselves.

Nothing here touches the network or needs numpy. The writers produce

* a tiny Llama base model in Hugging Face layout (``config.json``, ``model.safetensors``,
  ``tokenizer.json``),
* a PEFT LoRA adapter for it (``adapter_config.json``, ``adapter_model.safetensors``),
* a bad adapter whose ``layers.0.self_attn.q_proj.lora_A`` does not fit the base model,

and :func:`upload_model_files` does what a user of the Fireworks SDK does to upload them: ask
``models.get_upload_endpoint`` for signed URLs and ``PUT`` the raw bytes to each (the SDK has
no model-upload helper; its dataset helper sends the same two headers used here).
"""

from __future__ import annotations

import json
import random
import struct
import time
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import requests

# --------------------------------------------------------------------------------------------
# The tiny Llama
# --------------------------------------------------------------------------------------------

TINY_LLAMA_CONFIG: Dict[str, object] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}

TINY_LLAMA_CONTEXT_LENGTH = 512  # max_position_embeddings


def llama_tensor_shapes(config: Mapping[str, object] = TINY_LLAMA_CONFIG) -> List[Tuple[str, List[int]]]:
    """Every tensor a Llama checkpoint has, with its shape (no lm_head: embeddings are tied)."""
    hidden = int(config["hidden_size"])  # type: ignore[arg-type]
    layers = int(config["num_hidden_layers"])  # type: ignore[arg-type]
    heads = int(config["num_attention_heads"])  # type: ignore[arg-type]
    kv_heads = int(config["num_key_value_heads"])  # type: ignore[arg-type]
    inter = int(config["intermediate_size"])  # type: ignore[arg-type]
    vocab = int(config["vocab_size"])  # type: ignore[arg-type]
    head_dim = hidden // heads
    kv_dim = kv_heads * head_dim
    shapes: List[Tuple[str, List[int]]] = [("model.embed_tokens.weight", [vocab, hidden])]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", [hidden]),
            (p + "post_attention_layernorm.weight", [hidden]),
            (p + "self_attn.q_proj.weight", [hidden, hidden]),
            (p + "self_attn.k_proj.weight", [kv_dim, hidden]),
            (p + "self_attn.v_proj.weight", [kv_dim, hidden]),
            (p + "self_attn.o_proj.weight", [hidden, hidden]),
            (p + "mlp.gate_proj.weight", [inter, hidden]),
            (p + "mlp.up_proj.weight", [inter, hidden]),
            (p + "mlp.down_proj.weight", [hidden, inter]),
        ]
    shapes.append(("model.norm.weight", [hidden]))
    if not config.get("tie_word_embeddings", False):
        shapes.append(("lm_head.weight", [vocab, hidden]))
    return shapes


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# 90,432 for TINY_LLAMA_CONFIG: what validateUpload must report as baseModelDetails.parameterCount.
TINY_LLAMA_PARAMETER_COUNT = sum(_numel(s) for _, s in llama_tensor_shapes())

# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------


def safetensors_bytes(
    tensors: Iterable[Tuple[str, Sequence[int]]],
    *,
    seed: int = 0,
    scale: float = 0.02,
    ones: Iterable[str] = (),
) -> bytes:
    """Serialises F32 tensors of small random values in the safetensors format.

    The format: a little-endian u64 header length, a JSON header
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` padded with spaces to a multiple
    of 8, then the raw little-endian data, laid out contiguously in header order. Tensors named
    in ``ones`` are filled with 1.0 (norm weights).
    """
    rng = random.Random(seed)
    ones = set(ones)
    header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
    chunks: List[bytes] = []
    offset = 0
    for name, shape in sorted(tensors, key=lambda t: t[0]):
        n = _numel(shape)
        if name in ones:
            values = [1.0] * n
        else:
            values = [rng.uniform(-scale, scale) for _ in range(n)]
        data = struct.pack(f"<{n}f", *values)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


def read_safetensors_header(data: bytes) -> Dict[str, object]:
    """The JSON header of a safetensors blob (for tests that want to inspect what they wrote)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n].decode("utf-8"))


# --------------------------------------------------------------------------------------------
# tokenizer.json: a byte-level BPE over the 256 byte symbols (ids 0..255 = vocab_size)
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tokenizer_json() -> Dict[str, object]:
    """A minimal but complete Hugging Face ``tokenizers`` file: byte-level BPE, no merges."""
    mapping = _bytes_to_unicode()
    vocab = {mapping[b]: b for b in range(256)}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": dict(byte_level),
        "post_processor": dict(byte_level),
        "decoder": dict(byte_level),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=False).encode("utf-8") + b"\n"


# --------------------------------------------------------------------------------------------
# Base model files
# --------------------------------------------------------------------------------------------


def tiny_llama_files(
    *,
    seed: int = 1234,
    omit_tensors: Iterable[str] = (),
    config: Optional[Mapping[str, object]] = None,
) -> Dict[str, bytes]:
    """``{filename: bytes}`` of the tiny Llama checkpoint. ``omit_tensors`` drops tensors (to
    make a broken checkpoint)."""
    config = dict(config if config is not None else TINY_LLAMA_CONFIG)
    omit = set(omit_tensors)
    shapes = [(n, s) for n, s in llama_tensor_shapes(config) if n not in omit]
    norms = [n for n, _ in shapes if n.endswith("norm.weight")]
    return {
        "config.json": _json_bytes(config),
        "model.safetensors": safetensors_bytes(shapes, seed=seed, ones=norms),
        "tokenizer.json": _json_bytes(tokenizer_json()),
    }


def write_files(directory: Path, files: Mapping[str, bytes]) -> Dict[str, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out: Dict[str, Path] = {}
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        out[name] = path
    return out


def write_tiny_llama_checkpoint(directory: Path, **kwargs) -> Dict[str, Path]:
    """Writes the tiny Llama checkpoint into ``directory``; returns ``{filename: path}``."""
    return write_files(directory, tiny_llama_files(**kwargs))


# --------------------------------------------------------------------------------------------
# LoRA adapters
# --------------------------------------------------------------------------------------------

LORA_R = 8
LORA_TARGET_MODULES = ["q_proj", "v_proj"]

ADAPTER_CONFIG: Dict[str, object] = {
    "peft_type": "LORA",
    "r": LORA_R,
    "lora_alpha": 16,
    "target_modules": list(LORA_TARGET_MODULES),
    "bias": "none",
    "base_model_name_or_path": "tiny-llama",
    "task_type": "CAUSAL_LM",
}

# The tensor the bad adapter gets wrong (its in-features are 100, the base model's hidden size 64).
BAD_ADAPTER_TENSOR = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def lora_tensor_shapes(
    config: Mapping[str, object] = TINY_LLAMA_CONFIG, r: int = LORA_R
) -> List[Tuple[str, List[int]]]:
    hidden = int(config["hidden_size"])  # type: ignore[arg-type]
    heads = int(config["num_attention_heads"])  # type: ignore[arg-type]
    kv_dim = int(config["num_key_value_heads"]) * (hidden // heads)  # type: ignore[arg-type]
    out: List[Tuple[str, List[int]]] = []
    for i in range(int(config["num_hidden_layers"])):  # type: ignore[arg-type]
        p = f"base_model.model.model.layers.{i}.self_attn."
        out += [
            (p + "q_proj.lora_A.weight", [r, hidden]),
            (p + "q_proj.lora_B.weight", [hidden, r]),
            (p + "v_proj.lora_A.weight", [r, hidden]),
            (p + "v_proj.lora_B.weight", [kv_dim, r]),
        ]
    return out


def lora_adapter_files(*, seed: int = 99) -> Dict[str, bytes]:
    """``{filename: bytes}`` of a PEFT LoRA (r=8, q_proj and v_proj) for the tiny Llama."""
    return {
        "adapter_config.json": _json_bytes(ADAPTER_CONFIG),
        "adapter_model.safetensors": safetensors_bytes(lora_tensor_shapes(), seed=seed),
    }


def bad_lora_adapter_files(*, seed: int = 7) -> Dict[str, bytes]:
    """An adapter whose ``layers.0 q_proj lora_A`` is [8, 100]: it does not fit a 64-wide model."""
    shapes = [(n, ([LORA_R, 100] if n == BAD_ADAPTER_TENSOR else s)) for n, s in lora_tensor_shapes()]
    return {
        "adapter_config.json": _json_bytes(ADAPTER_CONFIG),
        "adapter_model.safetensors": safetensors_bytes(shapes, seed=seed),
    }


def write_lora_adapter(directory: Path, **kwargs) -> Dict[str, Path]:
    return write_files(directory, lora_adapter_files(**kwargs))


def write_bad_lora_adapter(directory: Path, **kwargs) -> Dict[str, Path]:
    return write_files(directory, bad_lora_adapter_files(**kwargs))


def read_dir(paths: Mapping[str, Path]) -> Dict[str, bytes]:
    return {name: Path(p).read_bytes() for name, p in paths.items()}


# --------------------------------------------------------------------------------------------
# Uploading through signed URLs, as an SDK user does
# --------------------------------------------------------------------------------------------


def put_signed(url: str, data: bytes, *, declared_size: Optional[int] = None, timeout: float = 30) -> requests.Response:
    """PUTs raw bytes to a signed upload URL the way Fireworks' own upload code does: no
    Authorization header (the signature authorises), ``application/octet-stream`` and
    ``x-goog-content-length-range: N,N`` with N the declared size."""
    size = len(data) if declared_size is None else declared_size
    return requests.put(
        url,
        data=data,
        headers={"Content-Type": "application/octet-stream", "x-goog-content-length-range": f"{size},{size}"},
        timeout=timeout,
    )


def upload_model_files(client, model_id: str, files: Mapping[str, bytes], *, account_id: Optional[str] = None) -> Dict[str, str]:
    """Gets signed upload URLs through the SDK and PUTs every file. Returns ``{filename: url}``.
    Raises ``AssertionError`` on anything unexpected (the caller is a test)."""
    kwargs = {} if account_id is None else {"account_id": account_id}
    resp = client.models.get_upload_endpoint(
        model_id, filename_to_size={name: str(len(data)) for name, data in files.items()}, **kwargs
    )
    urls = dict(resp.filename_to_signed_urls or {})
    assert sorted(urls) == sorted(files), f"signed URLs for {sorted(urls)}, asked for {sorted(files)}"
    for name, data in files.items():
        r = put_signed(urls[name], data)
        assert 200 <= r.status_code < 300, f"PUT {name}: HTTP {r.status_code} {r.text[:500]}"
    return urls


# --------------------------------------------------------------------------------------------
# Creating READY models through the SDK
# --------------------------------------------------------------------------------------------


def create_ready_base_model(client, model_id: str, directory: Path, *, display_name: str = "tiny llama"):
    """Creates an HF_BASE_MODEL, uploads the tiny Llama written into ``directory`` and validates
    it. Returns the READY model (SDK ``Model``)."""
    client.models.create(
        model_id=model_id,
        model={
            "kind": "HF_BASE_MODEL",
            "display_name": display_name,
            "base_model_details": {"checkpoint_format": "HUGGINGFACE"},
        },
    )
    upload_model_files(client, model_id, read_dir(write_tiny_llama_checkpoint(directory)))
    client.models.validate_upload(model_id)
    model = client.models.get(model_id)
    assert model.state == "READY", f"{model_id} is {model.state} after validateUpload"
    return model


def create_ready_addon(client, model_id: str, base_model_name: str, directory: Path, *, display_name: str = "tiny lora"):
    """Creates an HF_PEFT_ADDON on ``base_model_name``, uploads the LoRA written into
    ``directory`` and validates it. Returns the READY model."""
    client.models.create(
        model_id=model_id,
        model={
            "kind": "HF_PEFT_ADDON",
            "display_name": display_name,
            "peft_details": {"base_model": base_model_name, "r": LORA_R, "target_modules": list(LORA_TARGET_MODULES)},
        },
    )
    upload_model_files(client, model_id, read_dir(write_lora_adapter(directory)))
    client.models.validate_upload(model_id)
    model = client.models.get(model_id)
    assert model.state == "READY", f"{model_id} is {model.state} after validateUpload"
    return model


# --------------------------------------------------------------------------------------------
# Raw HTTP (for what the SDK would refuse to send) and error-body checks
# --------------------------------------------------------------------------------------------


class RawApi:
    """A thin ``requests`` client. Paths starting with ``/`` are taken from the server root;
    other paths are relative to ``/v1/accounts/{account}/``."""

    def __init__(self, base_url: str, api_key: Optional[str], account: str):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.account = account
        self.session = requests.Session()

    def url(self, path: str) -> str:
        if path.startswith("/"):
            return self.base_url + path
        return f"{self.base_url}/v1/accounts/{self.account}/{path}"

    def request(self, method: str, path: str, *, headers: Optional[Mapping[str, str]] = None, auth: bool = True, **kwargs) -> requests.Response:
        h = dict(headers or {})
        if auth and self.api_key is not None:
            h.setdefault("Authorization", f"Bearer {self.api_key}")
        kwargs.setdefault("timeout", 30)
        return self.session.request(method, self.url(path), headers=h, **kwargs)

    def get(self, path: str, **kw) -> requests.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return self.request("POST", path, **kw)

    def patch(self, path: str, **kw) -> requests.Response:
        return self.request("PATCH", path, **kw)

    def delete(self, path: str, **kw) -> requests.Response:
        return self.request("DELETE", path, **kw)

    def ok_json(self, method: str, path: str, **kw) -> Dict[str, object]:
        r = self.request(method, path, **kw)
        assert r.status_code == 200, f"{method} {path}: HTTP {r.status_code} {r.text[:1000]}"
        return r.json()

    def list_all(self, collection: str, key: str, **params) -> List[Dict[str, object]]:
        """Every item of a list call, following nextPageToken (pageSize 200)."""
        items: List[Dict[str, object]] = []
        token = None
        for _ in range(1000):
            q = dict(params, pageSize=200)
            if token:
                q["pageToken"] = token
            body = self.ok_json("GET", collection, params=q)
            items += body.get(key, [])  # type: ignore[arg-type]
            token = body.get("nextPageToken")
            if not token:
                return items
        raise AssertionError(f"{collection}: pagination did not end")

    def names(self, collection: str, key: str, **params) -> List[str]:
        return sorted(str(i["name"]) for i in self.list_all(collection, key, **params))


# google.rpc codes used by the tests
INVALID_ARGUMENT = 3
NOT_FOUND = 5
ALREADY_EXISTS = 6
PERMISSION_DENIED = 7
FAILED_PRECONDITION = 9
UNAUTHENTICATED = 16


def assert_rpc_error(resp: requests.Response, http_status: int, code: int) -> Dict[str, object]:
    """Asserts a google.rpc Status error body ``{"code", "message", "details": []}`` with the
    given HTTP status and code; returns the body."""
    assert resp.status_code == http_status, (
        f"{resp.request.method} {resp.url}: expected HTTP {http_status}, got {resp.status_code}: {resp.text[:1000]}"
    )
    try:
        body = resp.json()
    except ValueError:
        raise AssertionError(f"error body is not JSON: {resp.text[:1000]!r}") from None
    assert isinstance(body, dict), body
    assert body.get("code") == code, f"expected code {code}, got {body}"
    assert isinstance(body.get("message"), str) and body["message"], f"empty message: {body}"
    assert isinstance(body.get("details"), list), f"details is not a list: {body}"
    return body


def assert_sdk_error(exc: BaseException, http_status: int, code: int) -> Dict[str, object]:
    """The same check for an SDK ``APIStatusError``."""
    assert getattr(exc, "status_code", None) == http_status, f"expected HTTP {http_status}: {exc!r}"
    body = getattr(exc, "body", None)
    assert isinstance(body, dict), f"error body is not a JSON object: {body!r}"
    assert body.get("code") == code, f"expected code {code}, got {body}"
    assert isinstance(body.get("message"), str) and body["message"], f"empty message: {body}"
    assert isinstance(body.get("details"), list), f"details is not a list: {body}"
    return body


def perturb_gguf_norms(data: bytes, scale: float = 0.5) -> bytes:
    """The same GGUF with every ``attn_norm`` weight (an F32 tensor in any quantization)
    multiplied by ``1 + scale * sin(i)``: a model with the same shape and tokenizer that answers
    differently, as a new version of the weights would."""
    import math
    import struct

    buf = bytearray(data)
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        n = take("Q")
        nonlocal pos
        s = bytes(buf[pos:pos + n]).decode()
        pos += n
        return s

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(kind: int):
        if kind == 8:
            return string()
        if kind == 9:
            inner, n = take("I"), take("Q")
            return [value(inner) for _ in range(n)]
        return take(scalar[kind])

    assert bytes(buf[:4]) == b"GGUF", "not a GGUF file"
    pos = 4
    _version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    alignment = 32
    for _ in range(n_kv):
        key = string()
        v = value(take("I"))
        if key == "general.alignment":
            alignment = v
    tensors = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        kind, offset = take("I"), take("Q")
        tensors.append((name, dims, kind, offset))
    start = (pos + alignment - 1) // alignment * alignment
    changed = 0
    for name, dims, kind, offset in tensors:
        if kind != 0 or not name.endswith("attn_norm.weight"):
            continue
        n = math.prod(dims)
        at = start + offset
        values = struct.unpack_from(f"<{n}f", buf, at)
        struct.pack_into(f"<{n}f", buf, at, *(x * (1 + scale * math.sin(i)) for i, x in enumerate(values)))
        changed += 1
    assert changed, "no F32 attn_norm tensor to change"
    return bytes(buf)


def wait_deployment(client, dep_id: str, check, what: str, timeout: float = 60):
    """Polls a deployment until ``check(deployment)`` holds; returns it, or fails saying what it
    never did and where it stood."""
    deadline = time.monotonic() + timeout
    while True:
        d = client.deployments.get(dep_id)
        if check(d):
            return d
        assert time.monotonic() < deadline, (
            f"{dep_id} never {what}: {d.state} {d.status} active={getattr(d, 'active_model_version', None)}")
        time.sleep(0.2)


def moto_s3():
    """A local S3-compatible server (moto) and a boto3 client for it, for a module fixture to
    yield from: ``(endpoint, client)``. The credentials are those the test servers get."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="hearth", aws_secret_access_key="hearth-secret")
    try:
        yield endpoint, client
    finally:
        server.stop()
