"""Model, memory and checkpoint files: safetensors with a JSON header, written atomically.

Every file carries in its `__metadata__`: `format` (`ebmm.model`, `ebmm.memory` or
`ebmm.checkpoint`), `format_version`, the package version, the model config as JSON,
the pattern shape and the tensors' SHA-256 (`checksum`; files from before it have none);
a memory also its number of stored patterns and its size in floats.
A memory file is self-contained: it holds the slow parameters as well as the written
ones, so reading needs nothing else. Loading checks format, version, shapes and
finiteness and refuses anything else with an `EbmmError` naming the file. No pickle.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from ebmm_cli import __version__
from ebmm_cli.atomic import atomic_path
from ebmm_cli.energy import memory_names
from ebmm_cli.errors import EbmmError
from ebmm_cli.model import Memory, Model, ModelConfig
from ebmm_cli.safety import read_regular, regular

FORMAT_VERSION = "1"
MODEL, MEMORY, CHECKPOINT = "ebmm.model", "ebmm.memory", "ebmm.checkpoint"
_HINT = {
    MODEL: "a model (use it with --model)",
    MEMORY: "a memory (use it with --memory)",
    CHECKPOINT: "a training checkpoint",
}


def _header(model: Model, kind: str, **extra: Any) -> dict[str, str]:
    meta = {
        "format": kind,
        "format_version": FORMAT_VERSION,
        "ebmm_version": __version__,
        "config": model.config.to_json(),
        "shape": json.dumps(list(model.config.energy.shape)),
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> str:
    """SHA-256 of the tensors (names, dtypes, shapes and bytes, in name order) and, for
    files that say so (`checksum_covers`), of the rest of the header too: kept in the
    header and checked on load, so that damaged bytes, in the weights or in the config
    that says how to use them, are refused, not used."""
    h = hashlib.sha256()
    if meta is not None:
        rest = {k: v for k, v in meta.items() if k != "checksum"}
        h.update(json.dumps(rest, sort_keys=True, ensure_ascii=False).encode() + b";")
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write a safetensors file atomically, with its JSON header in sorted key order and
    the tensors' checksum in it.

    safetensors writes the header from a hash map, in an order that changes from run to
    run; sorting it (same bytes, same length) makes equal contents give equal files.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {**meta, "checksum_covers": _COVERS}
    data = save(tensors, metadata={**meta, "checksum": _digest(tensors, meta)})
    size = struct.unpack("<Q", data[:8])[0]
    header = json.dumps(
        json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    header += b" " * (size - len(header))  # safetensors pads the header with spaces too
    with atomic_path(path) as tmp:
        tmp.write_bytes(data[:8] + header + data[8 + size :])


def save_model(model: Model, path: Path, dtype: torch.dtype | None = None, **extra: Any) -> None:
    """Write a meta-learned model (`extra` goes into the header, e.g. the training step).
    `dtype` (e.g. float16, for the built-in models) narrows its floating tensors; loading
    widens them back to the model's float32."""
    state = dict(model.state_dict())
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    _write(path, state, _header(model, MODEL, **extra))


def save_memory(model: Model, memory: Memory, path: Path) -> None:
    """Write a self-contained memory file: the model plus the written parameters."""
    tensors = dict(model.state_dict())
    tensors.update({f"memory.{k}": v for k, v in memory.params.items()})
    if memory.decoder is not None:
        tensors.update({f"decoder_memory.{k}": v for k, v in memory.decoder.items()})
    meta = _header(model, MEMORY, patterns=memory.patterns, memory_floats=model.memory_floats())
    _write(path, tensors, meta)


def _open(path: Path, kind: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read header and tensors, checking the format, version and finiteness.

    Only a regular file of at most `MAX_FILE_BYTES` is read (checked before a byte is),
    and its header's config is range-checked before any tensor is made."""
    # One read: a file replaced meanwhile (a training run saving its model, which
    # `ebmm write` may be reading) is seen whole, old or new. safetensors' own
    # `safe_open` opens the path twice, and can pair one file's header with the
    # other's tensors.
    data = read_regular(path, MAX_FILE_BYTES)
    try:
        if len(data) >= 8 and struct.unpack("<Q", data[:8])[0] > _HEADER_LIMIT:
            raise ValueError("a header of more than 100,000,000 bytes")
        meta = _metadata(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
        tensors = load(data)  # checks the header and the offsets
    except Exception as e:  # safetensors raises its own error types, and OSError
        raise EbmmError(path, f"not a readable safetensors file ({e})") from None
    found = meta.get("format")
    if found != kind:
        what = _HINT.get(found, "not an ebmm file")
        raise EbmmError(
            path,
            f"is {what}, not {_HINT[kind].split(' (')[0]}"
            if found in _HINT
            else f"{what} (no ebmm format in its header)",
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise EbmmError(
            path,
            f"format version {meta.get('format_version')!r} is not supported "
            f"(this ebmm {__version__} reads version {FORMAT_VERSION})",
        )
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise EbmmError(path, f"tensor {name!r} holds NaN or infinite values")
    return meta, tensors


_HEADER_LIMIT = 100_000_000  # safetensors' own bound on the JSON header
MAX_FILE_BYTES = 1 << 30
"""The largest model, memory or checkpoint file read (the built-ins are under 1 MB)."""
_COVERS = "tensors+header"
"""`checksum_covers` of files whose checksum covers their header as well as their
tensors; files without it (from before) have a checksum of the tensors alone."""
# Bounds on a header's numbers, checked before a model is built from them.
_MAX_STEPS = 10_000
_MAX_SIDE = 4_096
_MAX_PATTERNS = 1_000_000


def _metadata(header: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file from its JSON header."""
    return json.loads(header).get("__metadata__") or {}


def read_header(path: Path) -> dict[str, str]:
    """A file's `__metadata__` (step, config, provenance...) without its tensors, read
    through one open file, so a file replaced meanwhile is seen old or new, not mixed.

    Raises:
        EbmmError: naming `path`, when it is missing or not a safetensors file.
    """
    regular(path)
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _HEADER_LIMIT:
                raise ValueError(f"a header of {length} bytes")
            return _metadata(f.read(length))
    except (OSError, ValueError, struct.error) as e:
        raise EbmmError(path, f"not a readable safetensors file ({e})") from None


def _verify(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that differ from the checksum in the header (files from before it
    have none). Checked after the named reasons (shapes, NaN), which say more."""
    covered = meta if meta.get("checksum_covers") == _COVERS else None
    if "checksum" in meta and meta["checksum"] != _digest(tensors, covered):
        raise EbmmError(path, "damaged: its tensors or header do not match its checksum")


def match_tensors(
    path: Path,
    got: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    what: str,
    against: str = "the config",
    hint: str = "",
) -> None:
    """Refuse tensors whose names or shapes differ from what `against` (the config in a
    file's header; for `ebmm train --init`, the run) builds; `hint` ends the message."""
    missing = sorted(set(expected) - set(got))
    unknown = sorted(set(got) - set(expected))
    if missing or unknown:
        raise EbmmError(
            path,
            f"{what} do not match {against} (missing {missing[:3]}, unexpected {unknown[:3]})"
            + hint,
        )
    for k, v in got.items():
        if v.shape != expected[k].shape:
            raise EbmmError(
                path,
                f"{what}: {k!r} has shape {tuple(v.shape)}, {against} needs "
                f"{tuple(expected[k].shape)}" + hint,
            )


def _bounded(value: Any, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{what} {value!r} is not an integer in [{low:,}, {high:,}]")
    return value


def check_config(text: str) -> None:
    """Range-check the numbers of a header's config that size what a model allocates
    (steps, pattern counts, the pattern shape), before anything is built from them.

    Raises:
        ValueError: naming the value, for `_model`'s one-line error.
    """
    raw = json.loads(text)
    rules, energy = raw["rules"], raw["energy"]
    for key in ("write_steps", "read_steps"):
        _bounded(rules.get(key, 1), 1, _MAX_STEPS, key)
    for key in ("rekeys", "decoder_steps", "refine"):
        _bounded(rules.get(key, 0), 0, _MAX_STEPS, key)
    patterns = rules.get("patterns")
    if patterns is not None:
        if not isinstance(patterns, list) or len(patterns) != 2:
            raise ValueError(f"patterns {patterns!r} is not [least, most]")
        least, most = (_bounded(v, 1, _MAX_PATTERNS, "patterns") for v in patterns)
        if least > most:
            raise ValueError(f"patterns {patterns!r}: least above most")
    shape = energy["shape"]
    if not isinstance(shape, list) or len(shape) not in (1, 3):
        raise ValueError(f"shape {shape!r} is neither [bits] nor [channels, height, width]")
    sides = shape if len(shape) == 1 else shape[1:]
    for side in sides:
        _bounded(side, 1, _MAX_SIDE, "shape")
    if len(shape) == 3:
        _bounded(shape[0], 1, 4, "channels")
    if energy.get("dynamic") is not None:
        _bounded(energy["dynamic"], 1, _MAX_SIDE, "dynamic")


def _model(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> Model:
    """The model a header's config describes, with the file's tensors. Built first on
    the meta device (shapes without storage), so a config whose network would not fit
    in memory is refused for its tensors' shapes before a byte is allocated."""
    state = {k: v for k, v in tensors.items() if not k.startswith(("memory.", "decoder_memory."))}
    try:
        check_config(meta["config"])
        config = ModelConfig.from_json(meta["config"])
        with torch.device("meta"):
            shapes = Model(config).state_dict()
    # EbmmError: a value the config cannot take, such as its distortion
    except (KeyError, ValueError, TypeError, AttributeError, EbmmError) as e:
        raise EbmmError(path, f"bad model config in the header ({e})") from None
    match_tensors(path, state, shapes, "tensors")
    model = Model(config)
    model.load_state_dict(state)
    return model


def load_model(path: Path) -> Model:
    """Load a model file written by `save_model`."""
    meta, tensors = _open(path, MODEL)
    model = _model(path, meta, tensors)
    _verify(path, meta, tensors)
    return model


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_memory(path: Path) -> tuple[Model, Memory]:
    """Load a memory file: its model and the written memory."""
    meta, tensors = _open(path, MEMORY)
    model = _model(path, meta, tensors)
    params = _prefixed(tensors, "memory.")
    energy_params = dict(model.energy.named_parameters())
    match_tensors(
        path, params, {n: energy_params[n] for n in memory_names(model.energy)}, "written tensors"
    )
    decoder = _prefixed(tensors, "decoder_memory.")
    expected = {} if model.decoder is None else dict(model.decoder.named_parameters())
    match_tensors(path, decoder, expected, "decoder tensors")
    try:
        patterns = _bounded(json.loads(meta["patterns"]), 1, _MAX_PATTERNS, "patterns")
    except KeyError:
        raise EbmmError(path, "no pattern count in the header") from None
    except ValueError as e:
        raise EbmmError(path, f"bad pattern count in the header ({e})") from None
    _verify(path, meta, tensors)
    return model, Memory(params, decoder or None, patterns)


def save_checkpoint(
    path: Path, model: Model, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Write a training checkpoint: model, optimiser state, and `state` (step, random
    generators, counters) as JSON; tensors inside `state` go in as tensors."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for index, entry in opt["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[f"state.{key}"] = value
    plain = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    # A capturable optimiser's rates are device tensors (`MetaStep`): stored as numbers.
    groups = [
        {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in g.items()}
        for g in opt["param_groups"]
    ]
    meta = _header(model, CHECKPOINT, param_groups=groups, state=plain)
    _write(path, tensors, meta)


def load_checkpoint(path: Path) -> tuple[Model, dict[str, Any], dict[str, Any]]:
    """Read a checkpoint: (model, optimiser state dict, training state)."""
    meta, tensors = _open(path, CHECKPOINT)
    model = _model(path, meta, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    try:
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                opt_state.setdefault(int(index), {})[name] = value
        optimizer = {"state": opt_state, "param_groups": json.loads(meta["param_groups"])}
        state = json.loads(meta["state"])
    except (KeyError, ValueError) as e:
        raise EbmmError(path, f"damaged checkpoint header ({e})") from None
    state.update({k[6:]: v for k, v in tensors.items() if k.startswith("state.")})
    _verify(path, meta, tensors)
    return model, optimizer, state


def model_parting(ours: Path, theirs: Path, rel_tol: float = 1e-5) -> dict[str, Any] | None:
    """Where two model files part, or None if they agree: the same bytes, or the same
    configuration and step with every weight within `rel_tol` of its tensor's scale.
    Otherwise `{"header": [keys]}` (configuration or step differ) or `{"weights": the
    largest relative difference}`. The same run in two processes is bit-identical in
    nearly every try, but MKL's CPU reductions can differ in the last bits (about 1 in
    50 processes): such a run parts by ~1e-7, a resume that lost a step or an episode by
    far more than 1e-5 (`meta.metrics_parting` is the same check for metrics)."""
    if ours.read_bytes() == theirs.read_bytes():
        return None
    a, b = ({k: v for k, v in read_header(p).items() if k != "checksum"} for p in (ours, theirs))
    if a != b:
        return {"header": sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))}
    x, y = (load_model(p).state_dict() for p in (ours, theirs))
    worst = max(((x[k] - y[k]).abs().max() / x[k].abs().max().clamp(min=1e-12)).item() for k in x)
    return None if worst <= rel_tol else {"weights": worst}
