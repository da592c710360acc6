"""ONNX Runtime sessions: which provider serves, with which options, on which verified file.

Preference comes from config (`model.providers`, default tensorrt, cuda, cpu). A provider is used when
ONNX Runtime offers it and a session with it can be created; otherwise the next one is tried, and the reason is
logged. TensorRT gets explicit optimization profiles for every dynamic input (batch 1, sequence and past length
up to the model's context), fp16/int8 flags, and engine and timing caches in the state directory, so engines are
built once and never rebuilt at run time. CUDA keeps the KV cache on the device (IO binding in generate.py).
CPU gets the configured intra-op thread count and sequential execution.

Memory: glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, so the weights ONNX
Runtime copies and prepacks while a session loads land on the heap between blocks that stay, and the freed ones
can never be given back: the same 0.5B model then peaks at 683 or 873 MB by the luck of address layout. While a
session opens, the threshold is pinned at 1 MiB (`large_blocks_mapped`): blocks above it are mapped and returned
when freed, and the same load peaks at 661 MB every time. Afterwards it stays at glibc's own ceiling, 32 MiB, so
the KV cache's per-step arrays are reused from the heap rather than mapped and faulted in afresh each step.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from edge_agent.glm.models import VerifiedModel

log = logging.getLogger(__name__)

PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
             "cpu": "CPUExecutionProvider"}


@dataclass
class RuntimeOptions:
    providers: list[str]
    threads: int = 1
    trt_fp16: bool = True
    trt_int8: bool = True
    trt_workspace_mb: int = 1024
    cache_dir: Path | None = None  # TensorRT engine and timing caches
    device_id: int = 0


LOAD_MMAP_THRESHOLD = 1 << 20  # bytes: blocks above are mapped while a session loads (glibc starts at 128 KiB)
RUN_MMAP_THRESHOLD = 32 << 20  # and afterwards: glibc's own ceiling for its dynamic threshold on 64-bit
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def _mallopt(param: int, value: int) -> bool:
    """True where the C library took it (glibc); False where it has no such knob (musl and others)."""
    try:
        return bool(ctypes.CDLL(None).mallopt(param, value))
    except (OSError, AttributeError):
        return False


@contextmanager
def large_blocks_mapped():
    """While ONNX Runtime copies and prepacks a model's weights, blocks above LOAD_MMAP_THRESHOLD are mapped on their
    own and given back when freed, so none is stranded on the heap below one that stays; afterwards the threshold
    is RUN_MMAP_THRESHOLD (pinned: glibc no longer moves it)."""
    pinned = _mallopt(_M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield pinned
    finally:
        if pinned:
            _mallopt(_M_MMAP_THRESHOLD, RUN_MMAP_THRESHOLD)


def trt_profiles(arch: dict[str, Any]) -> dict[str, str]:
    """TensorRT optimization profile shapes for every dynamic input: batch 1, 1..context tokens, 0..context-1 past."""
    ctx, n_kv, hd, layers = arch["context"], arch["num_key_value_heads"], arch["head_dim"], arch["num_hidden_layers"]
    opt_seq = min(64, ctx)

    def shapes(seq: int, past: int) -> str:
        items = [f"input_ids:1x{seq}", f"attention_mask:1x{past + seq}", f"position_ids:1x{seq}"]
        for i in range(layers):
            for kv in ("key", "value"):
                items.append(f"past_key_values.{i}.{kv}:1x{n_kv}x{past}x{hd}")
        return ",".join(items)

    return {"trt_profile_min_shapes": shapes(1, 0), "trt_profile_opt_shapes": shapes(1, opt_seq),
            "trt_profile_max_shapes": shapes(ctx, ctx - 1)}


def provider_options(kind: str, opts: RuntimeOptions, arch: dict[str, Any], content: str = "") -> dict[str, Any]:
    """`content`: the sha256 of the graph the provider serves (from the verified manifest). TensorRT's engine cache is
    keyed by file name, input names and versions, not by weights (onnxruntime#6455): engines live in a folder named
    after the content, so a retrained model with the same name never runs an old engine."""
    if kind == "tensorrt":
        o: dict[str, Any] = {
            "device_id": opts.device_id,
            "trt_fp16_enable": opts.trt_fp16,
            "trt_int8_enable": opts.trt_int8,  # the QDQ file carries its scales: no calibration table needed
            "trt_max_workspace_size": opts.trt_workspace_mb << 20,
            "trt_engine_cache_enable": opts.cache_dir is not None,
            "trt_timing_cache_enable": opts.cache_dir is not None,
            "trt_builder_optimization_level": 3,
            **trt_profiles(arch),
        }
        if opts.cache_dir is not None:
            o["trt_engine_cache_path"] = str(opts.cache_dir / "trt-engines" / (content[:32] or "unkeyed"))
            o["trt_timing_cache_path"] = str(opts.cache_dir / "trt-timing")
        return o
    if kind == "cuda":
        return {"device_id": opts.device_id, "arena_extend_strategy": "kSameAsRequested",
                "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True}
    return {}


def session_options(opts: RuntimeOptions):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


class PassedOver(NamedTuple):
    """A preferred provider that does not serve, and why; `expected` when the build simply lacks it (a CPU box)."""
    provider: str
    why: str
    expected: bool = False

    def __str__(self) -> str:
        return f"{self.provider}: {self.why}"


SEAL = ".sealed.json"  # in a cache folder: each file's sha256 and size, as the agent last wrote or checked them


def _sums(folder: Path) -> dict[str, list]:
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name == SEAL:
            continue
        if p.is_symlink() or not p.is_file():
            out[p.name] = None
            continue
        h = hashlib.sha256()
        with p.open("rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        out[p.name] = [h.hexdigest(), p.stat().st_size]
    return out


def check_cache(folder: Path) -> list[str]:
    """Before ONNX Runtime reads a TensorRT cache folder: a file the seal does not list as it is now (changed, added,
    a link, or no seal at all) is removed, so TensorRT builds it again rather than running an engine nobody checked.
    The folder must be the agent's own (mode 0700). Returns the names removed."""
    st = folder.stat(follow_symlinks=False)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(f"{folder}: the TensorRT cache must be the agent's own, mode 0700")
    try:
        sealed = json.loads((folder / SEAL).read_text())
    except (OSError, ValueError):
        sealed = {}
    removed = []
    for name, got in _sums(folder).items():
        if got is None or sealed.get(name) != got:
            p = folder / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(name)
    if removed:
        log.warning("TensorRT cache files not as sealed were removed (they are built again)",
                    extra={"folder": str(folder), "removed": ",".join(removed)[:300]})
    return removed


def seal_cache(folder: Path) -> None:
    """Record the cache folder's files as they are now (after a session built or checked them)."""
    tmp = folder / (SEAL + ".tmp")
    tmp.write_text(json.dumps(_sums(folder), sort_keys=True))
    os.replace(tmp, folder / SEAL)


@dataclass
class Session:
    sess: Any  # onnxruntime.InferenceSession
    provider: str  # the short name that serves: tensorrt | cuda | cpu
    file: str
    reasons: list[PassedOver]  # why earlier preferences were passed over


def open_session(model: VerifiedModel, opts: RuntimeOptions, available: list[str] | None = None) -> Session:
    """The first preferred provider that works; raises RuntimeError when none does."""
    import onnxruntime as ort

    available = ort.get_available_providers() if available is None else available
    reasons: list[PassedOver] = []
    for kind in opts.providers:
        name = PROVIDERS[kind]
        if name not in available:
            reasons.append(PassedOver(kind, "not offered by this onnxruntime build", expected=True))
            continue
        if name not in model.manifest["providers"]:
            reasons.append(PassedOver(kind, "the model ships no file for it"))
            continue
        file = model.file_for(name)
        chain = [(name, provider_options(kind, opts, model.arch, model.manifest["files"][file]["sha256"]))]
        if kind != "cpu":
            chain.append(("CPUExecutionProvider", {}))  # nodes the GPU provider declines still need a home
        caches: tuple[Path, ...] = ()
        if kind == "tensorrt" and opts.cache_dir is not None:
            caches = (opts.cache_dir / "trt-engines" / model.manifest["files"][file]["sha256"][:32],
                      opts.cache_dir / "trt-timing")
            try:
                for d in caches:
                    d.mkdir(mode=0o700, parents=True, exist_ok=True)
                    check_cache(d)  # engines are code the GPU runs: only what this agent wrote and sealed is kept
            except OSError as e:  # PermissionError: a cache folder others may write
                reasons.append(PassedOver(kind, f"engine cache: {e}"))
                continue
        try:
            source = model.source(file)  # the verified file itself (see glm/models.py)
            with large_blocks_mapped():
                sess = ort.InferenceSession(source, sess_options=session_options(opts),
                                            providers=[c[0] for c in chain], provider_options=[c[1] for c in chain])
        except Exception as e:  # noqa: BLE001 - a provider that cannot start: say why, try the next
            reasons.append(PassedOver(kind, f"session failed: {type(e).__name__}: {str(e)[:200]}"))
            continue
        if sess.get_providers()[0] != name:
            reasons.append(PassedOver(kind, f"onnxruntime fell back to {sess.get_providers()[0]}"))
            continue
        model.check_unchanged(file)  # what ONNX Runtime read is what was verified (raises ModelError)
        for d in caches:
            seal_cache(d)  # the engines TensorRT built (or found, checked) are recorded for the next load
        return Session(sess, kind, file, reasons)
    raise RuntimeError("no execution provider could serve the model: " + "; ".join(map(str, reasons)))
