"""Turn a model spec string from the CLI into a model plus example inputs.

Accepted specs:
  demo                   the built-in DemoGPT (attncc/models/demo.py)
  timm:NAME              a timm model with random weights
  hf:ARCH                a tiny transformers model of that model type (llama, gpt2, bert, ...)
  hf:PATH                a transformers model saved in a local directory
  path/to/file.py:fn     fn() in that file returns (model, example_inputs)

Every user mistake raises AttnccError with a one-sentence message. Nothing is
ever downloaded: timm and hf:ARCH models get random weights, hf:PATH must exist.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from attncc.errors import AttnccError

ACCEPTED_FORMS = "demo, timm:NAME, hf:MODEL_TYPE, hf:LOCAL_DIR or path/to/file.py:factory"
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")

# Sizes for hf:ARCH. A generic size is set only where the default config of that
# model type has the key with an int value (so tuples such as swin's per-stage heads
# are left alone); one table then serves most architectures. The per-arch table
# covers configs whose sizes go by other names or must agree with each other.
_HF_TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 128,
    "head_dim": 16,
    # encoder-decoders in the bart family
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    # vision transformers (vit, deit, beit, dinov2, ...): 16 patches
    "image_size": 32,
    "patch_size": 8,
}
_HF_ARCH_OVERRIDES = {
    "t5": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4},
    "vit": {"image_size": 32, "patch_size": 8},
    "swin": {"embed_dim": 32, "depths": [1, 1], "num_heads": [2, 4], "image_size": 32, "patch_size": 4, "window_size": 4},
}
_HF_KNOWN_EXAMPLES = ("llama", "mistral", "qwen2", "gemma2", "gpt2", "bert", "t5", "vit")
_DEFAULT_TEXT_LEN = 64


@dataclass
class LoadedModel:
    """A model ready to compile.

    model: an nn.Module in eval mode.
    example_inputs: positional args (tuple) or keyword args (dict) for model(...).
    description: one line for humans, e.g. what was built and the input shapes.
    """

    model: nn.Module
    example_inputs: tuple | dict
    description: str


def load_model(spec: str, *, seq_len: int | None = None, batch: int = 1, attn: str = "eager") -> LoadedModel:
    """Build the model a spec names, with example inputs of batch `batch`.

    seq_len: tokens per example for text models (demo: 512, hf: 64 when None);
    ignored by timm models and factory files. attn: "eager" or "sdpa", the
    transformers attention implementation for hf: specs.
    Raises AttnccError for any mistake in the spec or a missing optional package.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise AttnccError(f"empty model spec; accepted forms: {ACCEPTED_FORMS}")
    spec = spec.strip()
    if seq_len is not None and seq_len < 1:
        raise AttnccError(f"seq_len must be a positive integer, got {seq_len}")
    if batch < 1:
        raise AttnccError(f"batch must be a positive integer, got {batch}")
    if attn not in ATTN_IMPLEMENTATIONS:
        raise AttnccError(f"unknown attention implementation {attn!r}; use one of {', '.join(ATTN_IMPLEMENTATIONS)}")

    if spec == "demo":
        # Imported here because demo.py imports LoadedModel from this module.
        from attncc.models.demo import build_demo_model

        return build_demo_model(seq_len=seq_len or 512, batch=batch)
    if spec.startswith("timm:"):
        return _load_timm(spec[len("timm:"):], batch=batch)
    if spec.startswith("hf:"):
        return _load_hf(spec[len("hf:"):], seq_len=seq_len, batch=batch, attn=attn)
    path, sep, factory = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return _load_factory(path, factory)
    if spec.endswith(".py"):
        raise AttnccError(f"{spec!r} names a file but no factory; write it as {spec}:FUNCTION")
    raise AttnccError(f"unrecognised model spec {spec!r}; accepted forms: {ACCEPTED_FORMS}")


# ---------------------------------------------------------------- timm


def _load_timm(name: str, *, batch: int) -> LoadedModel:
    """timm.create_model(name) with random weights; input randn [batch, *pretrained_cfg.input_size]."""
    try:
        import timm
    except ImportError:
        raise AttnccError("timm: specs need the timm package; install it with `pip install timm`") from None
    if not name:
        raise AttnccError("timm: needs a model name, e.g. timm:vit_tiny_patch16_224")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for the names"
        raise AttnccError(f"timm has no model named {name!r}{hint}")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    input_size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))
    x = torch.randn(batch, *input_size)
    description = (
        f"timm:{name} ({_millions(model)} params, random weights), input [{batch}, "
        f"{', '.join(map(str, input_size))}]; seq_len is ignored for timm models"
    )
    return LoadedModel(model=model, example_inputs=(x,), description=description)


# ---------------------------------------------------------------- transformers


def _load_hf(target: str, *, seq_len: int | None, batch: int, attn: str) -> LoadedModel:
    """A tiny hf:MODEL_TYPE with random weights, or a model saved in a local directory."""
    try:
        import transformers
        from transformers import AutoConfig, AutoModel
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:
        raise AttnccError(
            "hf: specs need the transformers package; install it with `pip install transformers`"
        ) from None
    if not target:
        raise AttnccError("hf: needs a model type (e.g. hf:llama) or a local directory (e.g. hf:./my_model)")

    # A directory wins over a model type of the same name: the user pointed at files.
    if os.path.isdir(target):
        torch.manual_seed(0)
        try:
            model = AutoModel.from_pretrained(target, attn_implementation=attn)
        except Exception as e:  # transformers raises many types for unusable directories
            raise AttnccError(f"could not load a transformers model from {target}: {_one_line(e)}") from e
        source = f"hf:{target} ({type(model).__name__}, {_millions(model)} params)"
    else:
        if target not in CONFIG_MAPPING:
            if "/" in target or os.sep in target or target.startswith("."):
                raise AttnccError(
                    f"no such directory: {target} (hf: loads local directories only; nothing is downloaded)"
                )
            close = difflib.get_close_matches(target, list(CONFIG_MAPPING.keys()), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise AttnccError(
                f"unknown transformers model type {target!r}; {hint}known types include "
                f"{', '.join(_HF_KNOWN_EXAMPLES)} (transformers {transformers.__version__})"
            )
        cfg = _tiny_hf_config(AutoConfig, target, seq_len=seq_len or _DEFAULT_TEXT_LEN)
        torch.manual_seed(0)
        try:
            model = AutoModel.from_config(cfg, attn_implementation=attn)
        except Exception as e:
            raise AttnccError(f"could not build a tiny hf:{target} with attn={attn}: {_one_line(e)}") from e
        source = f"hf:{target} (tiny {type(model).__name__}, {_millions(model)} params, random weights)"

    model = model.eval()
    inputs, shapes = _hf_inputs(model, seq_len=seq_len or _DEFAULT_TEXT_LEN, batch=batch)
    return LoadedModel(model=model, example_inputs=inputs, description=f"{source}, attn={attn}, {shapes}")


def _tiny_hf_config(AutoConfig, arch: str, *, seq_len: int):
    """A config of model type `arch` shrunk to the sizes in _HF_TINY / _HF_ARCH_OVERRIDES."""
    try:
        default = AutoConfig.for_model(arch)
    except Exception as e:
        raise AttnccError(f"could not create a default config for hf:{arch}: {_one_line(e)}") from e
    overrides = _HF_ARCH_OVERRIDES.get(arch, {})
    sizes = {k: v for k, v in _HF_TINY.items() if _is_int(getattr(default, k, None)) and _settable(default, k)}
    sizes.update({k: v for k, v in overrides.items() if hasattr(default, k) and _settable(default, k)})
    # Position tables must cover the requested sequence (e.g. bert has 512 positions);
    # +2 because roberta-style models start counting positions after the pad id.
    max_pos = getattr(default, "max_position_embeddings", None)
    if _is_int(max_pos) and max_pos < seq_len + 2 and _settable(default, "max_position_embeddings"):
        sizes["max_position_embeddings"] = seq_len + 2
    # Special token ids of the full-size vocab would fall outside the tiny one;
    # transformers warns about that, so move them inside.
    vocab = sizes.get("vocab_size")
    if vocab is not None:
        for key, value in default.to_dict().items():
            if key.endswith("_token_id") and _is_int(value) and value >= vocab and _settable(default, key):
                sizes[key] = vocab - 1
    try:
        # Passed to the constructor rather than set afterwards: some configs derive
        # fields from these sizes in __init__ (e.g. qwen2's per-layer layer_types).
        return AutoConfig.for_model(arch, **sizes)
    except Exception as e:
        raise AttnccError(f"could not create a tiny config for hf:{arch}: {_one_line(e)}") from e


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _settable(cfg, key: str) -> bool:
    """False for read-only properties (e.g. falcon's derived head_dim), which the constructor rejects."""
    attr = getattr(type(cfg), key, None)
    return not (isinstance(attr, property) and attr.fset is None)


def _hf_inputs(model: nn.Module, *, seq_len: int, batch: int) -> tuple[dict, str]:
    """Example kwargs for a transformers model, and a short description of their shapes.

    Vision (config has image_size and num_channels): pixel_values [batch, C, H, W].
    Encoder-decoder: input_ids and decoder_input_ids, int64 [batch, seq_len].
    Other text models: input_ids int64 [batch, seq_len] in [0, vocab_size).
    use_cache=False is added for text models that take it, so no KV cache is built.
    """
    cfg = model.config
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input not in ("input_ids", "pixel_values"):
        raise AttnccError(
            f"{type(model).__name__} takes {main_input} inputs, which attncc cannot make up; "
            "use a factory file (path/to/file.py:factory) that returns the model and its inputs"
        )
    if hasattr(cfg, "image_size") and hasattr(cfg, "num_channels"):
        h, w = _pair(cfg.image_size)
        pixel_values = torch.randn(batch, cfg.num_channels, h, w)
        return {"pixel_values": pixel_values}, f"pixel_values [{batch}, {cfg.num_channels}, {h}, {w}]"

    vocab = getattr(cfg, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise AttnccError(
            f"attncc cannot make example inputs for {type(model).__name__}: its config has neither "
            "image_size/num_channels nor a vocab_size"
        )
    inputs: dict = {"input_ids": torch.randint(0, vocab, (batch, seq_len))}
    shapes = f"input_ids [{batch}, {seq_len}]"
    if getattr(cfg, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(0, vocab, (batch, seq_len))
        shapes += f", decoder_input_ids [{batch}, {seq_len}]"
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs["use_cache"] = False
    return inputs, shapes


# ---------------------------------------------------------------- factory files


def _load_factory(path: str, factory: str) -> LoadedModel:
    """Import `path` and call `factory()`, which returns (model, example_inputs)."""
    if not os.path.isfile(path):
        raise AttnccError(f"no such file: {path}")
    if not factory.isidentifier():
        raise AttnccError(f"{factory!r} is not a valid function name; write the spec as {path}:FUNCTION")
    module = _import_file(path)
    fn = getattr(module, factory, None)
    if fn is None:
        raise AttnccError(f"{path} defines no {factory!r}; it must define {factory}() returning (model, example_inputs)")
    if not callable(fn):
        raise AttnccError(f"{path}:{factory} is a {type(fn).__name__}, not a function")
    try:
        result = fn()
    except Exception as e:
        raise AttnccError(f"{path}:{factory}() raised {_one_line(e)}") from e

    if isinstance(result, nn.Module):
        raise AttnccError(
            f"{path}:{factory}() returned only a model; return (model, example_inputs) so attncc has inputs to trace"
        )
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise AttnccError(
            f"{path}:{factory}() must return (model, example_inputs), got {_describe(result)}"
        )
    model, example_inputs = result
    # A lone tensor is the common single-input case; lists become tuples for model(*args).
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    elif not isinstance(example_inputs, (tuple, dict)):
        raise AttnccError(
            f"{path}:{factory}() returned example inputs of type {type(example_inputs).__name__}; "
            "use a tensor, a tuple of positional args or a dict of keyword args"
        )
    model = model.eval()  # attncc compiles for inference; dropout would break output checks.
    description = (
        f"{path}:{factory} ({type(model).__name__}, {_millions(model)} params); "
        "seq_len and batch are fixed by the factory's example inputs"
    )
    return LoadedModel(model=model, example_inputs=example_inputs, description=description)


def _import_file(path: str):
    """Import a .py file as a fresh module named after it."""
    name = "attncc_user_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise AttnccError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: dataclasses and pickling inside the file look
    # the module up in sys.modules.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise AttnccError(f"importing {path} failed: {_one_line(e)}") from e
    return module


# ---------------------------------------------------------------- helpers


def _pair(size) -> tuple[int, int]:
    """image_size as (H, W): configs store an int or a pair."""
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def _millions(model: nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"


def _one_line(e: BaseException) -> str:
    """'Type: first line of the message', so AttnccError messages stay one line."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    # First sentence only: transformers errors go on to long advice and links.
    first = lines[0]
    end = first.find(". ")
    return f"{type(e).__name__}: {first[: end + 1] if end > 0 else first}"


def _describe(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"
